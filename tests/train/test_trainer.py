"""The training loop end to end on a seconds-long run with in-memory data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aoe.train import trainer as trainer_module
from aoe.train.checkpoint import list_checkpoints, load_model, verify_checkpoint
from aoe.train.trainer import NonFiniteError, train

from conftest import fake_data, tiny_run_config


def train_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_loss_falls_on_learnable_data(tmp_path):
    config = tiny_run_config(tmp_path, schedule={"max_steps": 40, "warmup_steps": 4})
    result = train(config, data=fake_data(config))
    losses = train_losses(result.run_dir)
    assert len(losses) == 40
    # Uniform guessing over 64 tokens costs ln(64) = 4.16 nats; the counting pattern is learnable.
    assert losses[1] > 4.0
    assert losses[40] < 3.0
    assert result.metrics["val_loss"] < 3.0
    assert result.metrics["val_ppl"] == pytest.approx(math.exp(result.metrics["val_loss"]))


def test_run_folder_contents(tmp_path):
    config = tiny_run_config(tmp_path, kind="aoe", train={"tensorboard": True, "peak_flops": None})
    result = train(config, data=fake_data(config))
    run_dir = result.run_dir
    for name in ("config.json", "metrics.jsonl", "summary.json", "routing.json", "report.md", "loss_curve.png",
                 "peak_flops.json", "train.log"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").iterdir())
    peak = json.loads((run_dir / "peak_flops.json").read_text())
    assert peak["flops"] == result.metrics["peak_flops"] > 1e8
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["ffn"]["kind"] == "aoe"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens_seen"] == 12 * 2 * 4 * 32
    assert summary["total_params"] == config.model.num_params() == summary["built_params"]
    assert len(summary["ent_load"]) == config.model.n_layers
    assert summary["mean_active_experts"] == pytest.approx(2.0)
    # AoE scores are L2 norms, so every per-expert mean score is positive.
    assert all(score > 0 for layer in summary["mean_score"] for score in layer)
    routing = json.loads((run_dir / "routing.json").read_text())
    assert [entry["step"] for entry in routing["train"]] == [6, 12]
    assert routing["train"][0]["layers"][0]["num_tokens"] == 6 * 2 * 4 * 32
    assert routing["val_final"]["layers"][0]["num_tokens"] == 2 * 4 * 32
    assert [s for s, _ in list_checkpoints(run_dir)] == [8, 12]


def test_resume_repeats_uninterrupted_losses(tmp_path):
    # Evaluation at the checkpoint step too: resuming must not depend on what evaluation did.
    full = tiny_run_config(tmp_path / "a", train={"eval_interval": 4})
    full_losses = train_losses(train(full, data=fake_data(full)).run_dir)

    # Stop after 5 steps (checkpoint at 4), then resume the same run to the end.
    short = tiny_run_config(tmp_path / "b", train={"eval_interval": 4})
    data = fake_data(short)
    original_step = trainer_module._Loop.train_step
    calls = {"n": 0}

    def crash_after_five(self, batches):
        if calls["n"] == 5:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original_step(self, batches)

    trainer_module._Loop.train_step = crash_after_five
    try:
        with pytest.raises(KeyboardInterrupt):
            train(short, data=data)
    finally:
        trainer_module._Loop.train_step = original_step
    assert [s for s, _ in list_checkpoints(short.run_dir)] == [4]
    resumed = train(short, data=fake_data(short))
    assert train_losses(resumed.run_dir) == full_losses


def test_non_finite_loss_stops_without_saving(tmp_path, monkeypatch):
    config = tiny_run_config(tmp_path)
    original_forward = trainer_module.Transformer.forward
    calls = {"n": 0}

    def poisoned_forward(self, *args, **kwargs):
        out = original_forward(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and calls["n"] > 2 * 6:  # from the 7th step on (2 micro-batches per step)
            out.ce_sum = out.ce_sum * float("nan")
        return out

    monkeypatch.setattr(trainer_module.Transformer, "forward", poisoned_forward)
    with pytest.raises(NonFiniteError, match="at step 7"):
        train(config, data=fake_data(config))
    checkpoints = list_checkpoints(config.run_dir)
    assert [s for s, _ in checkpoints] == [4]
    verify_checkpoint(checkpoints[0][1])


def test_load_model_restores_weights(tmp_path):
    config = tiny_run_config(tmp_path)
    data = fake_data(config)
    result = train(config, data=data)
    model, loaded_config = load_model(result.run_dir)
    assert loaded_config == config
    assert not model.training
    with torch.no_grad():
        outputs = [model(b.input_ids, labels=b.labels) for b in data.val_batches]
    val_loss = sum(float(o.ce_sum) for o in outputs) / sum(int(o.num_valid) for o in outputs)
    assert val_loss == pytest.approx(result.metrics["val_loss"], rel=1e-6)
    model8, _ = load_model(result.run_dir, step=8)
    assert not torch.equal(model8.embed.weight, model.embed.weight)
