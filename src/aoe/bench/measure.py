"""Timing and memory measurement for CPU benchmarks that share the machine with other work.

Timing: every case runs once to warm up, then the cases run round-robin ``repeats`` times and
each keeps the median. Interleaving spreads load from other processes over all cases alike, so
ratios between cases measured in one run are more stable than their absolute rates.

Memory: resident set size (RSS) sampled from /proc/self/statm by a background thread every
0.5 ms while one step runs. glibc's mmap threshold is pinned at 64 KiB first, so that every
tensor buffer is its own mapping, is returned to the OS when freed, and RSS follows live
tensor memory instead of the allocator's cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 64 * 1024
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def pin_malloc_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold so freed tensors leave RSS; returns False where that is not possible."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except OSError:
        return False


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


class PeakRSS:
    """Context manager that records the peak RSS above the RSS at entry, in bytes.

    A thread samples the RSS every ``interval_s`` seconds, which can miss a short peak when
    other processes hold the cores. On Linux the kernel's high-water mark (VmHWM, reset by
    writing 5 to /proc/self/clear_refs) is read as well, and the larger of the two counts.
    NOTE: the kernel updates VmHWM lazily, so neither source alone is exact.
    """

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel_peak = False

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self._kernel_peak = _reset_peak_rss()
        self.baseline = self.peak = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        kernel_peak = _kernel_peak_rss() if self._kernel_peak else None
        self.peak = max(self.peak, current_rss_bytes(), kernel_peak or 0)

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) on Linux; return whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _kernel_peak_rss() is not None


def _kernel_peak_rss() -> int | None:
    """Return VmHWM from /proc/self/status in bytes, or None where it is not available."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakCUDA:
    """Context manager that records the peak CUDA memory allocated above the amount at entry, in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0
        self.peak = 0

    def __enter__(self) -> "PeakCUDA":
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


def memory_meter(device: torch.device) -> PeakRSS | PeakCUDA:
    """Return the peak-memory meter for tensors on ``device``."""
    return PeakCUDA(device) if device.type == "cuda" else PeakRSS()


def synchronized(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """``step`` followed by a wait for the device, so that host timers measure the device's work."""
    if device.type != "cuda":
        return step

    def wrapped() -> None:
        step()
        torch.cuda.synchronize(device)

    return wrapped


@dataclass
class Case:
    """One thing to time: ``step`` runs it once; the counts turn a time into rates."""

    name: str
    step: Callable[[], None]
    flops: float = 0.0  # per step
    tokens: int = 0  # per step
    times: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def time_interleaved(cases: list[Case], repeats: int, desc: str,
                     meter: Callable[[], PeakRSS | PeakCUDA] | None = None) -> dict[str, int]:
    """Warm up each case once, then time all cases round-robin ``repeats`` times.

    With ``meter``, the last timed repeat of each case also records its peak memory, which is
    returned by case name; the RSS sampler's thread costs every case alike.
    """
    peaks: dict[str, int] = {}
    total = len(cases) * (repeats + 1)
    with tqdm(total=total, desc=desc, leave=False) as progress:
        for case in cases:
            case.step()
            progress.update()
        for repeat in range(repeats):
            for case in cases:
                measure = meter is not None and repeat == repeats - 1
                with meter() if measure else contextlib.nullcontext() as memory:
                    start = time.perf_counter()
                    case.step()
                    case.times.append(time.perf_counter() - start)
                if measure:
                    peaks[case.name] = memory.delta
                progress.update()
    return peaks


def matmul_case(dtype: torch.dtype, size: int, layout: str = "nn", device: torch.device | None = None) -> Case:
    """Build the case of a square dense matmul; ``layout`` "nt" multiplies by a transposed view, as ``F.linear`` does."""
    device = device or torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    if layout == "nt":
        b = b.t()
    elif layout != "nn":
        raise ValueError(f"invalid layout {layout!r}: expected 'nn' or 'nt'")

    def step() -> None:
        torch.matmul(a, b)

    return Case(f"matmul {size} {layout}", synchronized(step, device), flops=2.0 * size**3)
