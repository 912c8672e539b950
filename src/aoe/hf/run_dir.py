"""Read a training run folder: its config, its newest good checkpoint, and its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aoe.model.decoder import Transformer


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"not a run folder: {path} is missing")
    return json.loads(path.read_text())


def load_run_model(run_dir: str | Path, step: int | None = None) -> tuple[Transformer, dict[str, Any]]:
    """Load a run's newest good checkpoint (or ``step``) in eval mode on the CPU, with its config dict."""
    from aoe.train.checkpoint import load_model

    model, _ = load_model(run_dir, step=step, device="cpu")
    return model.eval(), read_run_config(run_dir)


def run_tokenizer_path(run_dir: str | Path, config: dict[str, Any] | None = None) -> Path | None:
    """Return DATA/tokenizer of the run's prepared data folder (``data.path``), or None if absent.

    A relative ``data.path`` is tried from the working directory first, then from the run
    folder's parent, because runs are usually started from the repository root.
    """
    config = config if config is not None else read_run_config(run_dir)
    data_path = (config.get("data") or {}).get("path")
    if not data_path:
        return None
    candidates = [Path(data_path)]
    if not Path(data_path).is_absolute():
        candidates.append(Path(run_dir).resolve().parent / data_path)
    for candidate in candidates:
        if (candidate / "tokenizer").is_dir():
            return candidate / "tokenizer"
    return None
