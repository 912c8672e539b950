"""Atomic file writes for the analysis reports and converted checkpoints.

Each writer puts the data in a temporary file in the target folder, fsyncs it and renames it over
the target, so that a crash leaves either the old file or the new one, never a partial file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` as one safetensors file; tensors are made contiguous and unshared first."""
    from safetensors.torch import save

    owned = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    atomic_write_bytes(path, save(owned, metadata=metadata))
