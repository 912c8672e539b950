"""``aoe sweep``: planning, statistics, and a two-configuration grid trained twice (the second time skips)."""

import json
import os
import math
import random

import pytest

from aoe.analysis import sweep
from aoe.analysis.grid import grid_run
from aoe.cli import main

# A few steps of the CPU-scale models, without the parts of a run that only cost time here.
FAST = ["schedule.max_steps=3", "model.n_layers=2", "schedule.warmup_steps=1", "train.eval_batches=2", "train.eval_interval=2",
        "train.log_interval=1", "train.tensorboard=false", "train.progress=false", "train.peak_flops=1e9",
        "data.micro_batch_size=2", "data.seq_len=32"]


def test_plan_puts_headline_pair_first():
    plan = sweep.plan_grid("all")
    assert plan[:2] == [("moe-laux", 0), ("aoe-dlow256-laux", 0)]
    assert plan[2:6] == [("moe-laux", 1), ("aoe-dlow256-laux", 1), ("moe-laux", 2), ("aoe-dlow256-laux", 2)]
    assert len(plan) == 21
    assert len(set(plan)) == 21


def test_plan_with_explicit_configs_and_seeds():
    assert sweep.plan_grid("dense, moe", seeds=2) == [("dense", 0), ("dense", 1), ("moe", 0), ("moe", 1)]
    with pytest.raises(ValueError, match="did you mean"):
        sweep.plan_grid("moe,aoe-dlow265")
    with pytest.raises(ValueError, match="--seeds"):
        sweep.plan_grid("moe", seeds=0)


def test_welch_z_matches_hand_computation():
    a, b = [1.0, 2.0, 3.0], [3.0, 4.0, 5.0, 6.0]
    # means 2 and 4.5, variances 1 and 5/3: z = -2.5 / sqrt(1/3 + 5/12)
    assert sweep.welch_z(a, b) == pytest.approx(-2.5 / math.sqrt(1 / 3 + 5 / 12))
    assert math.isnan(sweep.welch_z([1.0], b))
    assert sweep.mean_std([2.0]) == (2.0, 0.0)


def test_config_differences_ignore_bookkeeping():
    config = grid_run("moe", 0, data_path="d", out_dir="o", vocab_size=300)
    stored = json.loads(json.dumps(config.to_dict()))
    stored["train"]["log_interval"] = 999
    stored["train"]["out_dir"] = "elsewhere"
    assert sweep.config_differences(stored, config) == []
    stored["optim"]["lr"] = 0.5
    assert sweep.config_differences(stored, config) == ["optim.lr"]


def _write_corpus(folder):
    rng = random.Random(0)
    words = ["expert", "router", "token", "norm", "layer", "model", "the", "a", "of", "selects", "computes"]
    folder.mkdir()
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(60))
        (folder / f"doc{i}.txt").write_text(text)


def test_sweep_runs_grid_then_skips_finished(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    _write_corpus(corpus)
    out = tmp_path / "sweep"
    args = ["sweep", "--out", str(out), "--corpus", str(corpus), "--bpe-vocab", "300",
            "--configs", "moe-laux,aoe-dlow256-laux", "--seeds", "1"]
    for override in FAST:
        args += ["--set", override]

    assert main(args) == 0
    first = capsys.readouterr().out
    assert "2 runs planned, 0 already finished, 2 to run" in first
    summaries = {}
    for name in ("moe-laux-seed0", "aoe-dlow256-laux-seed0"):
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        assert summary["steps"] == 3
        summaries[name] = summary
    assert json.loads((out / "data" / "meta.json").read_text())["vocab_size"] == 300

    report = (out / "report.md").read_text()
    assert f"{summaries['moe-laux-seed0']['val_loss']:.3f} ± 0.000" in report
    assert f"{summaries['aoe-dlow256-laux-seed0']['val_loss']:.3f} ± 0.000" in report
    assert "Not answered yet" not in report  # both headline configurations finished
    assert "Missing configurations" in report  # the other 15 rows are listed as missing
    for figure in ("sweep_loss.png", "sweep_entropy.png", "sweep_expert_norms.png"):
        assert (out / "figures" / figure).stat().st_size > 1000
    # Every run of the grid reads the data in the same order.
    records = sweep.collect_runs(out / "runs")
    assert {r.config["data"]["seed"] for r in records} == {0}
    assert {r.config["train"]["seed"] for r in records} == {0}

    mtime = (out / "runs" / "moe-laux-seed0" / "summary.json").stat().st_mtime_ns
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "2 runs planned, 2 already finished, 0 to run" in second
    assert (out / "runs" / "moe-laux-seed0" / "summary.json").stat().st_mtime_ns == mtime

    changed = args + ["--set", "optim.lr=0.005"]
    assert main(changed) == 2  # a finished run of another recipe is never silently mixed in
    assert "different config (optim.lr)" in capsys.readouterr().err


def test_run_lock_excludes_other_sweeps(tmp_path):
    run_dir = tmp_path / "moe-seed0"
    assert sweep.acquire_run_lock(run_dir)
    # This process is alive, so a second sweep (here: a second call) must skip the run.
    assert not sweep.acquire_run_lock(run_dir)
    sweep.release_run_lock(run_dir)
    assert not (run_dir / sweep.LOCK_FILE).exists()


def test_stale_run_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "moe-seed0"
    run_dir.mkdir()
    # A process id above the kernel's pid_max belongs to no process: the lock of a killed sweep.
    (run_dir / sweep.LOCK_FILE).write_text("99999999")
    assert sweep.acquire_run_lock(run_dir)
    assert (run_dir / sweep.LOCK_FILE).read_text() == str(os.getpid())
