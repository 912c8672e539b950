"""The trainer on a folder prepared by aoe.data, and the `aoe train` command line."""

from __future__ import annotations

import json
import shutil

import pytest

from aoe.cli import main
from aoe.train import trainer as trainer_module
from aoe.train.checkpoint import list_checkpoints
from aoe.train.config import DataConfig
from aoe.train.trainer import train

from conftest import tiny_run_config


def real_config(tmp_path, data_path, **sections):
    config = tiny_run_config(tmp_path, vocab_size=320, **sections)
    config.data = DataConfig(path=str(data_path), seq_len=32, micro_batch_size=4, grad_accum_steps=2, seed=3)
    return config


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_resume_on_prepared_data_is_exact(tmp_path, prepared_data):
    full = real_config(tmp_path / "a", prepared_data)
    reference = losses(train(full).run_dir)
    assert len(reference) == 12
    assert reference[12] < reference[1] - 0.5

    interrupted = real_config(tmp_path / "b", prepared_data)
    original_step = trainer_module._Loop.train_step
    calls = {"n": 0}

    def stop_after_six(self, batches):
        if calls["n"] == 6:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original_step(self, batches)

    trainer_module._Loop.train_step = stop_after_six
    try:
        with pytest.raises(KeyboardInterrupt):
            train(interrupted)
    finally:
        trainer_module._Loop.train_step = original_step
    assert [s for s, _ in list_checkpoints(interrupted.run_dir)] == [4]
    assert losses(train(interrupted).run_dir) == reference


def test_truncated_shard_message_reaches_the_user(tmp_path, prepared_data):
    data = tmp_path / "data"
    shutil.copytree(prepared_data, data)
    shard = sorted(data.glob("train_*.bin"))[0]
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 7)
    with pytest.raises(ValueError, match=shard.name):
        train(real_config(tmp_path, data))


def test_cli_bad_override_is_one_line(capsys):
    assert main(["train", "tiny-moe", "model.ffn.top_k=9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "aoe train: error: invalid model.ffn.top_k=9: expected an integer from 1 to n_experts=8"


def test_cli_trains_then_resumes_finished_run(tmp_path, prepared_data, capsys):
    args = ["train", "tiny-dense", f"data.path={prepared_data}", "model.vocab_size=auto", "model.d_model=32",
            "model.n_layers=1", "model.attention.n_heads=2", "model.ffn.d_ffn=64", "data.seq_len=32",
            "data.micro_batch_size=2", "schedule.max_steps=6", "schedule.warmup_steps=1", "train.eval_batches=1",
            "train.eval_interval=3", f"train.out_dir={tmp_path}", "train.progress=false", "train.tensorboard=false",
            "train.peak_flops=1e10", "checkpoint.interval=3"]
    assert main(args) == 0
    run_dir = tmp_path / "tiny-dense"
    first = losses(run_dir)
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "config.json").read_text())["model"]["vocab_size"] == 300
    records = (run_dir / "metrics.jsonl").read_text()
    # The same command again finds the finished run and only repeats the final evaluation.
    assert main(args) == 0
    assert losses(run_dir) == first
    assert (run_dir / "metrics.jsonl").read_text() == records
    # A different config on the same folder is rejected.
    assert main(args + ["optim.lr=5e-4"]) == 2
    assert "contains a run with optim.lr=0.001" in capsys.readouterr().err
