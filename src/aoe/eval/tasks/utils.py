"""Dataset loaders and prompt helpers for the local task configs in this folder.

lm-evaluation-harness calls each ``load_*`` as a task's ``custom_dataset`` with the task
metadata as keyword arguments; ``aoe eval --data-dir DIR`` puts ``data_dir`` there.
"""

from __future__ import annotations

import datasets

from aoe.eval import formats


def _data_dir(kwargs: dict) -> str:
    data_dir = kwargs.get("data_dir")
    if not data_dir:
        raise ValueError("local aoe tasks need metadata data_dir (aoe eval --data-dir DIR)")
    return data_dir


def _single_split(task: str, kwargs: dict) -> datasets.DatasetDict:
    docs = formats.read_task(task, _data_dir(kwargs))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_arc_easy(**kwargs):
    return _single_split("arc_easy", kwargs)


def load_arc_challenge(**kwargs):
    return _single_split("arc_challenge", kwargs)


def load_piqa(**kwargs):
    return _single_split("piqa", kwargs)


def load_siqa(**kwargs):
    return _single_split("siqa", kwargs)


def load_winogrande(**kwargs):
    return _single_split("winogrande", kwargs)


def load_hellaswag(**kwargs):
    return _single_split("hellaswag", kwargs)


def load_mnli(**kwargs):
    return _single_split("mnli", kwargs)


def load_mrpc(**kwargs):
    return _single_split("mrpc", kwargs)


def load_qnli(**kwargs):
    return _single_split("qnli", kwargs)


def load_qqp(**kwargs):
    return _single_split("qqp", kwargs)


def load_sst2(**kwargs):
    return _single_split("sst2", kwargs)


# ----- prompts that need code (same text as lm-eval's standard tasks) -------------------------


def mnli_doc_to_text(doc: dict) -> str:
    hypothesis = doc["hypothesis"].strip()
    if not hypothesis.endswith("."):
        hypothesis += "."
    return f"{doc['premise']}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:"


def winogrande_doc_to_text(doc: dict) -> int:
    # Partial scoring: the context differs per option, so the "text" is the gold context index.
    return doc["gold"]


def winogrande_doc_to_target(doc: dict) -> str:
    return doc["continuation"]


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    return doc["contexts"]
