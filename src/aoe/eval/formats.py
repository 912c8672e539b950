"""Readers for local copies of the evaluation sets, in their original and converted formats.

Each ``read_<task>(data_dir)`` finds the task's file under ``data_dir`` (candidate names in
``TASK_FILES``) and detects the record format from the records themselves. It returns
canonical documents with the fields that lm-evaluation-harness's standard task of the same
name reads, so the local task configs reuse the standard prompts:

- arc_easy / arc_challenge: question, choices (list[str]), gold. Original AI2 JSONL
  ({"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}) or the llm-foundry
  conversion ({"query": "Question: ...", "choices", "gold"}).
- piqa: goal, sol1, sol2, label. Original valid.jsonl plus valid-labels.lst (one label a line).
- siqa: context, question, answerA, answerB, answerC, label (0-based). Original dev.jsonl plus
  dev-labels.lst (1-based), or records that carry ``label_ix`` (0-based) themselves.
- winogrande: contexts (the sentence up to the blank, once per option), continuation, gold.
  Original ({"sentence", "option1", "option2", "answer": "1"|"2"}) or the llm-foundry conversion
  ({"context_options", "continuation", "gold"}).
- hellaswag: query, choices, gold. Original JSONL (ctx_a, ctx_b, activity_label, endings, label)
  or the 6-line text re-encoding (context, label, four endings).
- mnli, mrpc, qnli, qqp, sst2: GLUE dev TSVs; columns are found by header name.
- mmlu: question, choices, answer (0-3), subject, from headerless CSVs (question, A, B, C, D,
  answer letter) in test/ and dev/ (the few-shot pool).

A missing file raises ``FileNotFoundError`` naming every path tried.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

# task -> files tried in order under the data folder; the first that exists is read
TASK_FILES: dict[str, tuple[str, ...]] = {
    "arc_easy": ("arc_easy/arc_easy_test.jsonl", "arc_easy/ARC-Easy-Test.jsonl", "ARC-Easy/ARC-Easy-Test.jsonl",
                 "ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl"),
    "arc_challenge": ("arc_challenge/arc_challenge_test.jsonl", "arc_challenge/ARC-Challenge-Test.jsonl",
                      "ARC-Challenge/ARC-Challenge-Test.jsonl",
                      "ARC-V1-Feb2018-2/ARC-Challenge/ARC-Challenge-Test.jsonl"),
    "piqa": ("piqa/valid.jsonl",),
    "siqa": ("siqa/socialIWa_v1.4_dev_wDims.jsonl", "siqa/dev.jsonl", "socialiqa/dev.jsonl",
             "socialiqa-train-dev/dev.jsonl"),
    "winogrande": ("winogrande/winogrande_dev.jsonl", "winogrande/dev.jsonl", "winogrande_1.1/dev.jsonl"),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_val_full.txt"),
    "mnli": ("glue/mnli/dev_matched.tsv", "glue/MNLI/dev_matched.tsv", "MNLI/dev_matched.tsv"),
    "mrpc": ("glue/mrpc/dev.tsv", "glue/MRPC/dev.tsv", "MRPC/dev.tsv"),
    "qnli": ("glue/qnli/dev.tsv", "glue/QNLI/dev.tsv", "QNLI/dev.tsv"),
    "qqp": ("glue/qqp/dev.tsv", "glue/QQP/dev.tsv", "QQP/dev.tsv"),
    "sst2": ("glue/sst2/dev.tsv", "glue/SST-2/dev.tsv", "SST-2/dev.tsv"),
    "mmlu": ("mmlu/test", "MMLU/test", "data/test"),
}

MMLU_LETTERS = ("A", "B", "C", "D")


def find_task_file(task: str, data_dir: str | Path) -> Path:
    """Return the first existing candidate file (or folder, for MMLU) of ``task`` under ``data_dir``."""
    if task not in TASK_FILES:
        raise ValueError(f"unknown local task {task!r}; expected one of {', '.join(TASK_FILES)}")
    tried = [Path(data_dir) / name for name in TASK_FILES[task]]
    for path in tried:
        if path.exists():
            return path
    raise FileNotFoundError(f"no local data for task {task!r}; tried: {', '.join(str(p) for p in tried)}")


def _read_jsonl(path: Path) -> Iterator[dict]:
    # utf-8-sig: some copies start with a byte-order mark
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _read_label_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def _companion_labels(data_file: Path) -> Path | None:
    """valid.jsonl -> valid-labels.lst, dev.jsonl -> dev-labels.lst (the AI2 layout)."""
    candidate = data_file.with_name(f"{data_file.stem}-labels.lst")
    return candidate if candidate.exists() else None


# ----- multiple-choice science and commonsense -----------------------------------------------


def read_arc(path: Path) -> list[dict]:
    docs = []
    for record in _read_jsonl(path):
        if "query" in record:
            # llm-foundry conversion: the query already carries lm-eval's "Question: " prefix
            question = re.sub(r"^Question:\s*", "", record["query"]).strip()
            docs.append({"question": question, "choices": list(record["choices"]), "gold": int(record["gold"])})
        else:
            labels = [c["label"] for c in record["question"]["choices"]]
            docs.append({"question": record["question"]["stem"],
                         "choices": [c["text"] for c in record["question"]["choices"]],
                         "gold": labels.index(record["answerKey"])})
    return docs


def read_piqa(path: Path) -> list[dict]:
    labels_path = _companion_labels(path)
    if labels_path is None:
        raise FileNotFoundError(f"PIQA labels file {path.with_name(path.stem + '-labels.lst')} is missing")
    records = list(_read_jsonl(path))
    labels = _read_label_lines(labels_path)
    if len(records) != len(labels):
        raise ValueError(f"{path} has {len(records)} records but {labels_path} has {len(labels)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
            for r, label in zip(records, labels)]


def read_siqa(path: Path) -> list[dict]:
    records = list(_read_jsonl(path))
    labels_path = _companion_labels(path)
    if records and "label_ix" not in records[0]:
        if labels_path is None:
            raise FileNotFoundError(f"Social IQa labels file {path.with_name(path.stem + '-labels.lst')} is missing")
        # The AI2 labels file is 1-based.
        labels = [int(x) - 1 for x in _read_label_lines(labels_path)]
        if len(records) != len(labels):
            raise ValueError(f"{path} has {len(records)} records but {labels_path} has {len(labels)} labels")
    else:
        labels = [int(r["label_ix"]) for r in records]
    return [{"context": r["context"], "question": r["question"], "answerA": r["answerA"], "answerB": r["answerB"],
             "answerC": r["answerC"], "label": label} for r, label in zip(records, labels)]


def read_winogrande(path: Path) -> list[dict]:
    docs = []
    for record in _read_jsonl(path):
        if "context_options" in record:
            docs.append({"contexts": list(record["context_options"]), "continuation": record["continuation"].strip(),
                         "gold": int(record["gold"])})
        else:
            # Split at the blank as lm-eval's winogrande does: option + the text before "_"
            # is the context, the text after it is the shared continuation.
            sentence = record["sentence"]
            blank = sentence.index("_")
            docs.append({"contexts": [sentence[:blank] + record["option1"], sentence[:blank] + record["option2"]],
                         "continuation": sentence[blank + 1:].strip(),
                         "gold": int(record["answer"]) - 1})
    return docs


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: drop WikiHow bracket artefacts and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        docs = []
        for r in _read_jsonl(path):
            context = r["ctx_a"] + " " + r["ctx_b"].capitalize()
            docs.append({"query": hellaswag_preprocess(r["activity_label"] + ": " + context),
                         "choices": [hellaswag_preprocess(e) for e in r["endings"]], "gold": int(r["label"])})
        return docs
    # 6-line text records: context, label, then the four endings.
    # NOTE: this re-encoding joins ctx_a and ctx_b already, without capitalising ctx_b as
    # lm-eval does, so its prompts can differ from lm-eval's in one letter.
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if len(lines) % 6:
        raise ValueError(f"{path} has {len(lines)} lines, which is not a multiple of 6 (context, label, 4 endings)")
    docs = []
    for start in range(0, len(lines), 6):
        context, label, *endings = lines[start:start + 6]
        docs.append({"query": hellaswag_preprocess(context), "choices": [hellaswag_preprocess(e) for e in endings],
                     "gold": int(label)})
    return docs


# ----- GLUE -----------------------------------------------------------------------------------


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    # QUOTE_NONE: GLUE fields contain unbalanced double quotes that are part of the text.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [name.strip() for name in rows[0]], [row for row in rows[1:] if row]


def _column(header: list[str], path: Path, *names: str) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise ValueError(f"{path}: none of the columns {names} in header {header}")


def read_glue(task: str, path: Path) -> list[dict]:
    header, rows = _read_tsv(path)
    col = lambda *names: _column(header, path, *names)  # noqa: E731
    docs = []
    if task == "mnli":
        p, h, y = col("sentence1"), col("sentence2"), col("gold_label", "label")
        classes = {"entailment": 0, "neutral": 1, "contradiction": 2}
        docs = [{"premise": r[p], "hypothesis": r[h], "label": classes[r[y]]} for r in rows]
    elif task == "mrpc":
        a, b, y = col("#1 String", "sentence1"), col("#2 String", "sentence2"), col("Quality", "label")
        docs = [{"sentence1": r[a], "sentence2": r[b], "label": int(r[y])} for r in rows]
    elif task == "qnli":
        q, s, y = col("question"), col("sentence"), col("label")
        classes = {"entailment": 0, "not_entailment": 1}
        docs = [{"question": r[q], "sentence": r[s], "label": classes[r[y]]} for r in rows]
    elif task == "qqp":
        a, b, y = col("question1"), col("question2"), col("is_duplicate", "label")
        docs = [{"question1": r[a], "question2": r[b], "label": int(r[y])} for r in rows]
    elif task == "sst2":
        # The GLUE header names the column "sentence"; a known copy names it "text".
        s, y = col("sentence", "text"), col("label")
        docs = [{"sentence": r[s], "label": int(r[y])} for r in rows]
    else:
        raise ValueError(f"unknown GLUE task {task!r}")
    return docs


# ----- MMLU -----------------------------------------------------------------------------------


def _read_mmlu_csv(path: Path, subject: str) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    return [{"question": r[0], "choices": r[1:5], "answer": MMLU_LETTERS.index(r[5].strip()), "subject": subject}
            for r in rows]


def mmlu_subjects(data_dir: str | Path) -> list[str]:
    test_dir = find_task_file("mmlu", data_dir)
    return sorted(p.name[: -len("_test.csv")] for p in test_dir.glob("*_test.csv"))


def read_mmlu(data_dir: str | Path, subject: str, split: str) -> list[dict]:
    """``split`` is "test" or "dev" (the five few-shot exemplars of the subject)."""
    test_dir = find_task_file("mmlu", data_dir)
    path = test_dir.parent / split / f"{subject}_{split}.csv"
    if not path.exists():
        raise FileNotFoundError(f"MMLU file {path} is missing")
    return _read_mmlu_csv(path, subject)


READERS = {
    "arc_easy": read_arc,
    "arc_challenge": read_arc,
    "piqa": read_piqa,
    "siqa": read_siqa,
    "winogrande": read_winogrande,
    "hellaswag": read_hellaswag,
}


def read_task(task: str, data_dir: str | Path) -> list[dict]:
    """Canonical documents of a local task (every task but MMLU, which is read per subject)."""
    path = find_task_file(task, data_dir)
    if task in READERS:
        return READERS[task](path)
    if task == "mmlu":
        raise ValueError("read MMLU per subject with read_mmlu(data_dir, subject, split)")
    return read_glue(task, path)
