"""Run records kept during training: the peak-FLOP/s measurement behind MFU, memory, the
metrics file, TensorBoard and the per-layer routing statistics."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from aoe.layers.routing import RoutingStats
from aoe.train.checkpoint import atomic_write_text

log = logging.getLogger(__name__)

PEAK_FILE = "peak_flops.json"


# ----- throughput ----------------------------------------------------------------------------


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Time square matmuls for about ``seconds`` and return the achieved FLOP/s.

    MFU divides by this number instead of a datasheet peak, because a dense matmul of a
    representative size is what this machine and torch build reach in practice.
    """
    size = 1024 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, generator=None).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: thread pool start and kernel selection
    _synchronize(device)
    iterations, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        iterations += 1
        _synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return 2 * size**3 * iterations / elapsed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(run_dir: Path, device: torch.device, dtype: torch.dtype, threads: int) -> float:
    """Return the measured matmul FLOP/s, cached in RUN/peak_flops.json per device, dtype and threads."""
    path = run_dir / PEAK_FILE
    key = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": threads}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            cached = None
            log.warning("ignoring the damaged cache %s (%s); measuring the peak again", path, exc)
        else:
            flops = cached.get("flops") if isinstance(cached, dict) else None
            if not (isinstance(flops, (int, float)) and not isinstance(flops, bool) and math.isfinite(flops) and flops > 0):
                log.warning("ignoring the damaged cache %s (expected an object with FLOP/s > 0 under 'flops'); "
                            "measuring the peak again", path)
            elif all(cached.get(k) == v for k, v in key.items()):
                return float(flops)
    # NOTE: the RNG state is saved and restored so that measuring leaves model initialisation
    # and any later sampling unchanged.
    rng = torch.get_rng_state()
    flops = measure_matmul_flops(device, dtype)
    torch.set_rng_state(rng)
    atomic_write_text(path, json.dumps({**key, "flops": flops}, indent=1))
    return flops


def memory_mb(device: torch.device) -> float:
    """Peak memory: allocated CUDA memory on a GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----- routing statistics --------------------------------------------------------------------


RoutingSums = list[RoutingStats | None]


def merge_routing(total: RoutingSums | None, new: RoutingSums) -> RoutingSums:
    """Add ``new`` to the running sums ``total``; the result never shares tensors with ``new``."""
    if total is None:
        return [None if s is None else RoutingStats(*(t.clone() for t in s.as_tuple())) for s in new]
    merged: RoutingSums = []
    for old, added in zip(total, new):
        if old is None or added is None:
            merged.append(old if added is None else added)
        else:
            merged.append(old.merge(added))
    return merged


def routing_summary(stats: RoutingSums | None) -> list[dict[str, Any] | None]:
    if stats is None:
        return []
    return [None if layer is None else layer.summary() for layer in stats]


def routing_to_tensors(prefix: str, stats: RoutingSums | None) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer, layer_stats in enumerate(stats or []):
        if layer_stats is None:
            continue
        for f in dataclasses.fields(layer_stats):
            tensors[f"{prefix}.{layer}.{f.name}"] = getattr(layer_stats, f.name)
    return tensors


def routing_from_tensors(prefix: str, tensors: dict[str, torch.Tensor], num_layers: int,
                         device: torch.device) -> RoutingSums | None:
    if not any(k.startswith(prefix + ".") for k in tensors):
        return None
    names = [f.name for f in dataclasses.fields(RoutingStats)]
    stats: RoutingSums = []
    for layer in range(num_layers):
        keys = [f"{prefix}.{layer}.{name}" for name in names]
        stats.append(RoutingStats(*(tensors[k].to(device) for k in keys)) if keys[0] in tensors else None)
    return stats


# ----- the metrics file and TensorBoard ------------------------------------------------------


class MetricsLog:
    """Appends JSON records to RUN/metrics.jsonl and scalars to TensorBoard in RUN/tb/.

    On resume from step k, records past k (written before a crash) are dropped first, so the
    file reads as one uninterrupted run. A finished run that is started again repeats its final
    evaluation, so ``final_step`` drops the validation record of that step too.
    """

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, final_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(resume_step, drop_val=resume_step == final_step)
        self._file = open(self.path, "a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int, drop_val: bool) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a crash
            if record.get("step", 0) > step or (drop_val and record.get("kind") == "val" and record.get("step") == step):
                continue
            kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            prefix = record.get("kind", "train")
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and value is not None:
                    self._writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
