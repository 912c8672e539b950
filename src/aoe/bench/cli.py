"""``aoe bench``: measure MoE and AoE layers and models on this machine and write docs/performance.md."""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from aoe.bench.measure import pin_malloc_mmap_threshold
from aoe.bench.report import evaluate, render
from aoe.bench.suite import DTYPES, Plan, run_suite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=Path("docs/performance.md"),
                        help="Markdown file to write (default: docs/performance.md)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes that check every code path in seconds; the numbers mean nothing")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated dtypes to measure, from fp32,bf16 (default: both)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default: 2)")
    parser.add_argument("--fp32-tokens", type=int, default=None, help="tokens per layer step in fp32 (default: 512)")
    parser.add_argument("--bf16-tokens", type=int, default=None, help="tokens per layer step in bf16 (default: 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to run; cuda uses paper-sized token batches unless --quick is given")


def plan_from(args: argparse.Namespace) -> Plan:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("invalid --device cuda: this torch build sees no CUDA device")
    if args.quick:
        plan = Plan.quick()
        plan.device = args.device
    else:
        plan = Plan.gpu() if args.device == "cuda" else Plan()
    if args.dtypes is not None:
        names = tuple(name.strip() for name in args.dtypes.split(",") if name.strip())
        unknown = [name for name in names if name not in DTYPES]
        if unknown or not names:
            raise ValueError(f"invalid --dtypes {args.dtypes!r}: expected a comma-separated subset of {','.join(DTYPES)}")
        plan.dtypes = names
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError(f"invalid --repeats {args.repeats}: expected an integer >= 1")
        plan.repeats = args.repeats
    for name, value in (("fp32", args.fp32_tokens), ("bf16", args.bf16_tokens)):
        if value is not None:
            if value < 1:
                raise ValueError(f"invalid --{name}-tokens {value}: expected an integer >= 1")
            plan.tokens[name] = value
    return plan


def environment(started: float, load_before: tuple[float, ...], device: str) -> dict[str, str]:
    import transformers

    load_after = os.getloadavg()
    gpu = {"GPU": torch.cuda.get_device_name()} if device == "cuda" else {}
    return {**gpu,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": f"{_cpu_name()}, {os.cpu_count()} logical cores visible, torch {torch.get_num_threads()} threads, "
               f"capability {torch.backends.cpu.get_cpu_capability()}, "
               f"native bf16 matmul: {bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}",
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        "load average (1 min) before and after": f"{load_before[0]:.1f} and {load_after[0]:.1f} "
                                                 "(other processes shared the cores during the run)",
        "wall time of the run": f"{time.perf_counter() - started:.0f} s",
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def run(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"invalid --threads {args.threads}: expected an integer >= 1")
        torch.set_num_threads(args.threads)
    if not pin_malloc_mmap_threshold():
        print("aoe bench: could not pin glibc's mmap threshold; memory numbers include allocator caching")
    started, load_before = time.perf_counter(), os.getloadavg()

    results = run_suite(plan)

    notes = []
    if plan.device == "cpu":
        notes = ["This run had no GPU, so the page records no GPU (H200) numbers. "
                 "`bench/gpu.sh` measures them on a machine with one.", ""]
    page = render(results, environment(started, load_before, plan.device), notes)
    write_atomic(args.output, page + "\n")
    for verdict in evaluate(results):
        status = "holds" if verdict.holds else f"MISSED ({verdict.shortfall})"
        print(f"{verdict.name}: {verdict.measured} (required {verdict.required}) {status}")
    print(f"wrote {args.output}")
    return 0
