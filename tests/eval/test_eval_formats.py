"""Local dataset readers: real rows from the shared data folder, and each original format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aoe.eval import formats

SHARED_EVAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"


def shared_eval_dir() -> Path:
    if not SHARED_EVAL.is_dir():
        reason = f"shared evaluation data not found at {SHARED_EVAL}"
        print(reason)
        pytest.skip(reason)
    return SHARED_EVAL


# task -> (index of a known row, a field to check, its expected start, expected gold/label)
KNOWN_ROWS = {
    "arc_easy": (0, "question", "Which statement best explains why photosynthesis", 0),
    "arc_challenge": (0, "question", "An astronomer observes that a planet rotates faster", 2),
    "piqa": (0, "sol1", "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper", 0),
    "siqa": (0, "answerC", "Find somewhere to go", 2),
    "winogrande": (0, "continuation", "always got the easier cases.", 1),
    "hellaswag": (0, "query", "Roof shingle removal: A man is sitting on a roof. he", 3),
    "mrpc": (0, "sentence1", "He said the foodservice pie business doesn't fit", 1),
    "qnli": (1, "question", "What is the first major city in the stream of the Rhine?", 1),
    "sst2": (1, "sentence", "unflinchingly bleak and desperate", 0),
}


def gold_of(doc: dict) -> int:
    return doc["gold"] if "gold" in doc else doc["label"]


@pytest.mark.needs_data
@pytest.mark.parametrize("task", list(KNOWN_ROWS))
def test_reads_real_rows(task):
    data_dir = shared_eval_dir()
    try:
        docs = formats.read_task(task, data_dir)
    except FileNotFoundError as exc:
        print(exc)
        pytest.skip(str(exc))
    index, field, start, gold = KNOWN_ROWS[task]
    assert docs[index][field].startswith(start)
    assert gold_of(docs[index]) == gold
    assert len(docs) > 100


@pytest.mark.needs_data
def test_reads_real_hellaswag_endings_and_winogrande_options():
    data_dir = shared_eval_dir()
    hellaswag = formats.read_task("hellaswag", data_dir)
    assert hellaswag[0]["choices"][3] == "starts pulling up roofing on a roof."
    assert len(hellaswag[0]["choices"]) == 4
    winogrande = formats.read_task("winogrande", data_dir)
    assert winogrande[0]["contexts"] == ["Sarah was a much better surgeon than Maria so Sarah",
                                         "Sarah was a much better surgeon than Maria so Maria"]


@pytest.mark.needs_data
def test_reads_real_mmlu_subject():
    data_dir = shared_eval_dir()
    subjects = formats.mmlu_subjects(data_dir)
    assert len(subjects) == 57
    dev = formats.read_mmlu(data_dir, "anatomy", "dev")
    assert len(dev) == 5
    assert dev[0]["question"] == "What is the embryological origin of the hyoid bone?"
    assert dev[0]["choices"][3] == "The second and third pharyngeal arches"
    assert dev[0]["answer"] == 3
    assert len(formats.read_mmlu(data_dir, "anatomy", "test")) > 50


# ----- original formats, written to a temporary folder ---------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_original_arc_format(tmp_path):
    write(tmp_path / "ARC-Easy" / "ARC-Easy-Test.jsonl", jsonl({
        "id": "x1", "answerKey": "C",
        "question": {"stem": "What melts ice?", "choices": [
            {"text": "cold", "label": "A"}, {"text": "dark", "label": "B"}, {"text": "heat", "label": "C"}]}}))
    (doc,) = formats.read_task("arc_easy", tmp_path)
    assert doc == {"question": "What melts ice?", "choices": ["cold", "dark", "heat"], "gold": 2}


def test_original_siqa_with_labels_file(tmp_path):
    record = {"context": "Kai lent a pen.", "question": "Why?", "answerA": "kind", "answerB": "rude", "answerC": "sad"}
    write(tmp_path / "siqa" / "dev.jsonl", jsonl(record, record))
    write(tmp_path / "siqa" / "dev-labels.lst", "1\n3\n")
    docs = formats.read_task("siqa", tmp_path)
    assert [d["label"] for d in docs] == [0, 2]


def test_piqa_labels_must_align(tmp_path):
    record = {"goal": "open a jar", "sol1": "twist", "sol2": "stare"}
    write(tmp_path / "piqa" / "valid.jsonl", jsonl(record, record))
    write(tmp_path / "piqa" / "valid-labels.lst", "0\n1\n")
    assert [d["label"] for d in formats.read_task("piqa", tmp_path)] == [0, 1]
    write(tmp_path / "piqa" / "valid-labels.lst", "0\n")
    with pytest.raises(ValueError, match="labels"):
        formats.read_task("piqa", tmp_path)


def test_original_winogrande_format(tmp_path):
    write(tmp_path / "winogrande" / "dev.jsonl", jsonl(
        {"sentence": "The cup broke the _ because it was weak.", "option1": "table", "option2": "glass", "answer": "2"}))
    (doc,) = formats.read_task("winogrande", tmp_path)
    assert doc["contexts"] == ["The cup broke the table", "The cup broke the glass"]
    assert doc["continuation"] == "because it was weak."
    assert doc["gold"] == 1


def test_original_hellaswag_format(tmp_path):
    write(tmp_path / "hellaswag" / "hellaswag_val.jsonl", jsonl({
        "activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
        "endings": ["bakes [title] bread.", "swims.", "flies.", "sings."], "label": "0"}))
    (doc,) = formats.read_task("hellaswag", tmp_path)
    assert doc["query"] == "Baking: A man mixes flour. He"
    assert doc["choices"][0] == "bakes. bread."
    assert doc["gold"] == 0


def test_glue_tsv_formats(tmp_path):
    write(tmp_path / "glue" / "mnli" / "dev_matched.tsv",
          "index\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
          "0\tfiction\tA dog runs.\tAn animal moves\tentailment\tentailment\n"
          "1\tfiction\tA dog runs.\tA cat sleeps.\tcontradiction\tcontradiction\n")
    write(tmp_path / "glue" / "qqp" / "dev.tsv",
          "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n7\t1\t2\tHow old?\tWhat age?\t1\n")
    write(tmp_path / "glue" / "sst2" / "dev.tsv", "sentence\tlabel\na \"quoted gem\t1\n")
    mnli = formats.read_task("mnli", tmp_path)
    assert [d["label"] for d in mnli] == [0, 2]
    assert mnli[0]["hypothesis"] == "An animal moves"
    assert formats.read_task("qqp", tmp_path) == [{"question1": "How old?", "question2": "What age?", "label": 1}]
    assert formats.read_task("sst2", tmp_path) == [{"sentence": 'a "quoted gem', "label": 1}]


def test_missing_task_names_paths_tried(tmp_path):
    with pytest.raises(FileNotFoundError, match="glue/qqp/dev.tsv"):
        formats.read_task("qqp", tmp_path)
