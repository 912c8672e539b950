"""Dataset loader for the local MMLU subject tasks (``custom_dataset`` of each subject config)."""

from __future__ import annotations

import datasets

from aoe.eval import formats


def load_mmlu(subject: str | None = None, **kwargs):
    data_dir = kwargs.get("data_dir")
    if not data_dir or not subject:
        raise ValueError("local MMLU tasks need metadata data_dir (aoe eval --data-dir DIR) and dataset_kwargs subject")
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(formats.read_mmlu(data_dir, subject, split)) for split in ("test", "dev")
    })
