"""Stress: SIGKILL a training run at random points, resume each time, compare every step's loss.

Run with `make stress` (pytest -m stress). Each start of `aoe train` pays the torch import,
so the whole test takes a few minutes on a small machine. The runs import a copy of the aoe
package taken at the start, because bit-for-bit equality only holds for identical code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aoe.train.checkpoint import find_checkpoint, list_checkpoints

from conftest import prepare_tiny_data

pytestmark = pytest.mark.stress

MAX_STEPS = 80
KILLS = 10
# Kill modes in order: during a checkpoint write (a .tmp- folder exists), a random moment
# after a new step, and during start-up before the first step.
MODES = ["write", "step", "write", "startup", "step", "write", "step", "write", "step", "write"]


def command(data_path: Path, out_dir: Path, run_name: str) -> list[str]:
    overrides = [
        f"data.path={data_path}", "model.vocab_size=auto", "model.d_model=64", "model.n_layers=2",
        "model.attention.n_heads=4", "model.ffn.d_ffn=64", "model.ffn.n_experts=4", "model.ffn.d_low=24", "model.ffn.d_wide=72",
        "data.seq_len=32", "data.micro_batch_size=4", "data.grad_accum_steps=2",
        f"schedule.max_steps={MAX_STEPS}", "schedule.warmup_steps=5", "train.eval_interval=10", "train.eval_batches=2",
        "train.log_interval=5", f"train.out_dir={out_dir}", f"train.run_name={run_name}", "train.num_threads=1",
        "train.progress=false", "train.tensorboard=false", "train.peak_flops=1e10",
        "checkpoint.interval=1", "checkpoint.keep_last=2",
    ]
    return [sys.executable, "-m", "aoe.cli", "train", "tiny-aoe", *overrides]


def train_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            assert record["step"] not in losses, f"step {record['step']} logged twice"
            losses[record["step"]] = record["loss"]
    return losses


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"kind": "train"' in line)


def writing_checkpoint(run_dir: Path, pid: int) -> bool:
    """Whether process ``pid`` has a checkpoint write in progress (its .tmp- folder exists)."""
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-") and p.name.endswith(f"-{pid}") for p in root.iterdir())


def kill_at(process: subprocess.Popen, run_dir: Path, mode: str, rng: random.Random) -> str:
    """Wait for the moment ``mode`` describes, SIGKILL the process and return where it was."""
    if mode == "startup":
        time.sleep(rng.uniform(0.2, 2.0))
    else:
        target = steps_logged(run_dir) + rng.randint(1, 5)
        deadline = time.monotonic() + 180
        while steps_logged(run_dir) < target:
            if process.poll() is not None or time.monotonic() > deadline:
                return "finished before the kill"
            time.sleep(0.005)
        if mode == "step":
            time.sleep(rng.uniform(0.0, 0.2))
        else:
            while not writing_checkpoint(run_dir, process.pid):
                if process.poll() is not None or time.monotonic() > deadline:
                    return "finished before the kill"
                time.sleep(0.0005)
    during_write = writing_checkpoint(run_dir, process.pid)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    if during_write or writing_checkpoint(run_dir, process.pid):
        return "during a checkpoint write"
    return "outside a checkpoint write"


def snapshot_package(tmp_path: Path) -> Path:
    """Copy the aoe package aside, so that every run uses the same code while the tree changes."""
    import aoe

    source = Path(aoe.__file__).parent
    target = tmp_path / "src"
    shutil.copytree(source, target / "aoe", ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_sigkill_resume_repeats_every_loss(tmp_path):
    data = prepare_tiny_data(tmp_path / "data")
    src = snapshot_package(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(src)}
    probe = subprocess.run([sys.executable, "-c", "import aoe; print(aoe.__file__)"], env=env,
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == str(src / "aoe" / "__init__.py")
    started = time.monotonic()

    reference_run = subprocess.run(command(data, tmp_path, "reference"), env=env, capture_output=True, text=True)
    assert reference_run.returncode == 0, reference_run.stderr[-2000:]
    reference = train_losses(tmp_path / "reference")
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))

    run_dir = tmp_path / "killed"
    rng = random.Random(7)
    outcomes = []
    for mode in MODES:
        process = subprocess.Popen(command(data, tmp_path, "killed"), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        outcomes.append((mode, kill_at(process, run_dir, mode, rng), steps_logged(run_dir)))
        good = find_checkpoint(run_dir)
        outcomes[-1] += (None if good is None else good.step,)

    final = subprocess.run(command(data, tmp_path, "killed"), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    elapsed = time.monotonic() - started
    print(f"\nSIGKILL stress: {len(MODES)} kills in {elapsed:.0f} s")
    for mode, where, logged, good_step in outcomes:
        print(f"  mode={mode:<8} killed {where:<28} steps logged {logged:>3}, newest good checkpoint {good_step}")

    kills = [o for o in outcomes if o[1] != "finished before the kill"]
    assert len(kills) == KILLS
    assert sum(o[1] == "during a checkpoint write" for o in outcomes) >= 3
    resumed = train_losses(run_dir)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    mismatched = [step for step in reference if resumed[step] != reference[step]]
    assert mismatched == [], f"losses differ at steps {mismatched[:10]}"
    assert [s for s, _ in list_checkpoints(run_dir)] == [MAX_STEPS - 1, MAX_STEPS]
