"""Checkpoints that resume a run exactly and survive a crash at any point.

Layout of one checkpoint, RUN/checkpoints/step_XXXXXXXX/:
    model.safetensors      Transformer.state_dict(); a tied head is stored as its own copy, so
                           that ``model.load_state_dict(safetensors.torch.load_file(...))`` works
    optimizer.safetensors  every tensor of the optimizer state, keyed "state.<param>.<name>"
    optimizer.json         the rest of the optimizer state dict (param groups, key structure)
    state.safetensors      tensor trainer state: torch RNG states, routing-statistics sums
    state.json             step, tokens seen, data-loader state, Python and NumPy RNG states
    manifest.json          sha256 and size of every file above, written last

Nothing is pickled, so loading runs no code from the checkpoint.

Crash safety: a checkpoint is written into a hidden temporary folder, every file and the folder
are fsynced, and only then is the folder renamed to step_XXXXXXXX (an atomic rename on POSIX
file systems). A crash leaves either the complete checkpoint or a temporary folder that the
next start deletes. Loading checks every file against the manifest; a checkpoint that fails
the check is rejected with the file named, and resuming falls back to the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
MANIFEST = "manifest.json"
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_JSON, STATE_TENSORS, STATE_JSON)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupted."""


@dataclass
class Checkpoint:
    """A verified checkpoint on disk."""

    step: int
    path: Path


# ----- file helpers ------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(unshared(tensors), str(path))
    apply_default_permissions(path)
    _fsync_file(path)


def apply_default_permissions(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything below it) the modes a plain open() would give.

    safetensors and ``tempfile.mkdtemp`` create files 0600 and folders 0700, which would leave
    weights that other users of a shared machine cannot read, unlike the JSON files beside them.
    """
    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors that share storage with an earlier one (a tied head), which safetensors rejects."""
    result: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        key = tensor.untyped_storage().data_ptr()
        result[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return result


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file through a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----- state flattening --------------------------------------------------------------------


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into named tensors and a JSON structure."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    structure: dict[str, Any] = {"param_groups": state_dict["param_groups"], "state": {}}
    for index, entry in state_dict["state"].items():
        flat: dict[str, Any] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                key = f"state.{index}.{name}"
                tensors[key] = value
                flat[name] = {"tensor": key}
            else:
                flat[name] = {"value": value}
        structure["state"][str(index)] = flat
    return tensors, structure


def unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for index, entry in structure["state"].items():
        state[int(index)] = {name: tensors[item["tensor"]] if "tensor" in item else item["value"]
                             for name, item in entry.items()}
    groups = []
    for group in structure["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return the Python, NumPy and torch RNG states as (JSON part, tensor part)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    json_part = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    return json_part, tensors


def set_rng_state(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = json_part["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


# ----- writing -----------------------------------------------------------------------------


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], state_tensors: dict[str, torch.Tensor], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep_last``."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    opt_tensors, opt_structure = flatten_optimizer(optimizer)
    rng_json, rng_tensors = rng_state()
    _save_tensors(tmp / MODEL_FILE, model.state_dict())
    _save_tensors(tmp / OPTIMIZER_TENSORS, opt_tensors)
    _write_json(tmp / OPTIMIZER_JSON, opt_structure)
    _save_tensors(tmp / STATE_TENSORS, {**state_tensors, **rng_tensors})
    _write_json(tmp / STATE_JSON, {**state, "step": step, "rng": rng_json})
    files = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in REQUIRED_FILES}
    _write_json(tmp / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": files})
    _fsync_dir(tmp)

    install_checkpoint(tmp, final)
    prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints; each goes through a hidden name first."""
    for step, path in list_checkpoints(run_dir)[:-keep_last]:
        trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
        os.rename(path, trash)
        shutil.rmtree(trash)
    _fsync_dir(checkpoint_root(run_dir))


def clean_partial_writes(run_dir: str | Path) -> list[Path]:
    """Delete temporary folders that an interrupted save or prune left behind."""
    root = checkpoint_root(run_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# ----- reading -----------------------------------------------------------------------------


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """List the step_XXXXXXXX folders as (step, path), oldest first, without verifying them."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith("step_") and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def _read_json(path: Path, checkpoint: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupted checkpoint {checkpoint}: {path.name} is not valid JSON ({exc})") from None


def _check_manifest(manifest: Any, path: Path) -> dict[str, dict[str, Any]]:
    """Return the manifest's file table, or raise CheckpointError naming what is malformed."""
    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"corrupted checkpoint {path}: {MANIFEST} is not a valid manifest ({reason})")

    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise bad("expected an object with a 'files' table")
    files = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"corrupted checkpoint {path}: {MANIFEST} does not list {name}")
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not isinstance(entry.get("bytes"), int) or isinstance(entry.get("bytes"), bool):
            got = f"keys {sorted(entry)}" if isinstance(entry, dict) else type(entry).__name__
            raise bad(f"the entry of {name} needs a 'sha256' string and a 'bytes' integer, got {got}")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise bad(f"file name {name!r} points outside the checkpoint")
    return files


# Keys of state.json that resuming reads; save_checkpoint adds step and rng to the caller's state.
STATE_KEYS = {"step": int, "micro_step": int, "tokens_seen": int, "loader": dict, "rng": dict}


def _check_state(state: Any, path: Path) -> None:
    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"corrupted checkpoint {path}: {STATE_JSON} is not a valid trainer state ({reason})")

    if not isinstance(state, dict):
        raise bad("expected an object")
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise bad(f"{key!r} must be a {kind.__name__}, got {state.get(key)!r}")
    rng = state["rng"]
    if not (isinstance(rng.get("python"), list) and len(rng["python"]) == 3
            and isinstance(rng.get("numpy"), list) and len(rng["numpy"]) == 5):
        raise bad("'rng' must hold the Python and NumPy generator states")


def _check_optimizer(structure: Any, path: Path) -> None:
    if isinstance(structure, dict) and structure.get("format") == "dcp":
        return
    if not (isinstance(structure, dict) and isinstance(structure.get("param_groups"), list)
            and isinstance(structure.get("state"), dict)):
        raise CheckpointError(f"corrupted checkpoint {path}: {OPTIMIZER_JSON} is not a valid optimizer state "
                              "(expected an object with 'param_groups' and 'state')")


def _check_tensor_file(file: Path, path: Path, required: tuple[str, ...] = ()) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"corrupted checkpoint {path}: {file.name} is not a valid safetensors file ({exc})") from None
    missing = [key for key in required if key not in keys]
    if missing:
        raise CheckpointError(f"corrupted checkpoint {path}: {file.name} lacks the tensors {', '.join(missing)}")


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest, and the structure of its JSON files.

    Returns the manifest. Raises CheckpointError naming the first missing, truncated, modified
    or malformed file, so that callers can fall back to an older checkpoint.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"incomplete checkpoint {path}: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupted checkpoint {path}: {MANIFEST} is not a valid manifest ({exc})") from None
    files = _check_manifest(manifest, path)
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"incomplete checkpoint {path}: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"corrupted checkpoint {path}: {name} has {size} bytes, the manifest "
                                  f"records {expected['bytes']} (truncated or overwritten)")
        digest = sha256_file(file)
        if digest != expected["sha256"]:
            raise CheckpointError(f"corrupted checkpoint {path}: {name} has sha256 {digest[:12]}..., "
                                  f"the manifest records {expected['sha256'][:12]}...")
    # The files match the manifest; a checkpoint written by other code (or edited together with
    # its manifest) may still lack what loading reads.
    _check_state(_read_json(path / STATE_JSON, path), path)
    _check_optimizer(_read_json(path / OPTIMIZER_JSON, path), path)
    _check_tensor_file(path / MODEL_FILE, path)
    _check_tensor_file(path / STATE_TENSORS, path, required=("rng.torch",))
    _check_tensor_file(path / OPTIMIZER_TENSORS, path)
    return manifest


def scan_checkpoints(run_dir: str | Path) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """Verify checkpoints newest first; return the first good one (or None) and the rejected newer ones.

    Each rejected checkpoint comes with the reason that names its bad file. Checkpoints older
    than the good one are not read.
    """
    rejected = []
    for found_step, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            rejected.append((path, str(exc)))
            continue
        return Checkpoint(found_step, path), rejected
    return None, rejected


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Checkpoint | None:
    """Return the newest checkpoint that passes verification (or exactly ``step``), or None.

    A newer checkpoint that fails verification is skipped with a warning naming the bad file.
    With ``step`` given, a bad checkpoint raises CheckpointError instead.
    """
    if step is not None:
        candidates = list_checkpoints(run_dir)
        matches = [path for s, path in candidates if s == step]
        if not matches:
            known = ", ".join(str(s) for s, _ in candidates) or "none"
            raise CheckpointError(f"no checkpoint for step={step} in {checkpoint_root(run_dir)} (steps: {known})")
        verify_checkpoint(matches[0])
        return Checkpoint(step, matches[0])
    checkpoint, rejected = scan_checkpoints(run_dir)
    for _, reason in rejected:
        log.warning("skipping checkpoint: %s; falling back to an older one", reason)
    return checkpoint


def set_aside(path: Path) -> Path:
    """Rename a rejected checkpoint folder to NAME.rejected (or NAME.rejected-N) and return the new path.

    The folder is kept for inspection rather than deleted; the new name is not a step_XXXXXXXX
    name, so listing, resuming and pruning no longer see it.
    """
    target = path.with_name(f"{path.name}.rejected")
    index = 1
    while target.exists():
        index += 1
        target = path.with_name(f"{path.name}.rejected-{index}")
    os.rename(path, target)
    _fsync_dir(path.parent)
    return target


def install_checkpoint(tmp: Path, final: Path) -> None:
    """Rename a complete temporary checkpoint folder to its final name.

    A folder of that name already there failed verification earlier (a good one is never
    written twice); it is set aside as NAME.rejected, because rename cannot replace a non-empty
    folder and its files may still be worth inspecting.
    """
    if final.exists():
        kept = set_aside(final)
        log.warning("kept the rejected checkpoint %s as %s", final, kept.name)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def load_checkpoint(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load weights (and optimizer state and RNG) into the given objects; return the trainer state."""
    path = checkpoint.path
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path / MODEL_FILE), device=str(device)))
    state = json.loads((path / STATE_JSON).read_text())
    state_tensors = load_file(str(path / STATE_TENSORS))
    if optimizer is not None:
        structure = json.loads((path / OPTIMIZER_JSON).read_text())
        opt_tensors = load_file(str(path / OPTIMIZER_TENSORS))
        optimizer.load_state_dict(unflatten_optimizer(opt_tensors, structure))
    if restore_rng:
        set_rng_state(state["rng"], state_tensors)
    return state, {k: v for k, v in state_tensors.items() if not k.startswith("rng.")}


def load_model(run_dir: str | Path, step: int | None = None, device: str = "cpu"):
    """Load the newest good checkpoint of a run (or the one of ``step``) as (Transformer, RunConfig).

    The model is returned in eval mode on ``device``.
    """
    from aoe.model.decoder import Transformer

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"not a run folder: {config_path} is missing")
    config = read_run_config(config_path)
    checkpoint = find_checkpoint(run_dir, step)
    if checkpoint is None:
        raise CheckpointError(f"no good checkpoint in {checkpoint_root(run_dir)}")
    model = Transformer(config.model).to(device)
    try:
        model.load_state_dict(load_file(str(checkpoint.path / MODEL_FILE), device=str(device)))
    except RuntimeError as exc:  # tensor names or shapes that config.json does not describe
        first_line = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {checkpoint.path} does not fit the model of {config_path}: "
                              f"{first_line}") from None
    return model.eval(), config


def read_run_config(config_path: Path):
    """Read RUN/config.json as a RunConfig, raising CheckpointError naming the file when it is damaged."""
    from aoe.train.config import RunConfig

    try:
        data = json.loads(config_path.read_text())
        return RunConfig.from_dict(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"damaged run config {config_path}: {exc}; restore it or delete the run folder") from None
