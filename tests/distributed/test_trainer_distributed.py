"""``aoe.train.trainer.train`` on two gloo ranks: sharded data, matching losses, DCP checkpoints, resume at world size 1.

The data folder is synthetic (a repeating token pattern with noise), written in the format of
``aoe prepare`` without a tokenizer; the tests hand the trainer real ``PackedLoader``s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aoe.data.loader import PackedLoader, TokenDataset, eval_batches
from aoe.data.shards import META_FORMAT, META_VERSION, write_json_atomic, write_shard
from aoe.train.checkpoint import list_checkpoints, load_model
from aoe.train.config import CheckpointConfig, DataConfig, OptimConfig, RunConfig, ScheduleConfig, TrainConfig
from aoe.train.distributed import ParallelConfig, is_dcp_checkpoint, resume_loader
from aoe.train.trainer import DataSources, train
from dist_harness import run_ranks, single_thread, tiny_model_config  # noqa: F401 (autouse fixture)

SEQ_LEN = 32
STEPS = 8
INTERVAL = 4
GLOBAL_BATCH = 4
LOSS_TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    shards = {}
    for split, size in (("train", 6000), ("val", 600)):
        pattern = np.arange(size) % 11
        tokens = np.where(rng.random(size) < 0.7, pattern, rng.integers(0, 64, size)).astype(np.uint16)
        name = f"{split}_00000.bin"
        shards[split] = [{"file": name, "num_tokens": size, "sha256": write_shard(out / name, tokens)}]
    write_json_atomic(out / "meta.json", {"format": META_FORMAT, "version": META_VERSION, "vocab_size": 64,
                                          "dtype": "uint16", "shards": shards})
    return out


def run_config(data_dir: Path, out_dir: Path, run_name: str, micro_batch: int, mode: str) -> RunConfig:
    return RunConfig(
        name=run_name,
        model=tiny_model_config("moe"),
        data=DataConfig(path=str(data_dir), seq_len=SEQ_LEN, micro_batch_size=micro_batch),
        optim=OptimConfig(lr=3e-3, grad_clip=0.5),
        schedule=ScheduleConfig(warmup_steps=2, max_steps=STEPS, min_lr=1e-4),
        train=TrainConfig(log_interval=1, eval_interval=100, eval_batches=1, out_dir=str(out_dir),
                          tensorboard=False, progress=False, peak_flops=1e9, num_threads=1),
        checkpoint=CheckpointConfig(interval=INTERVAL, keep_last=3),
        parallel=ParallelConfig(mode=mode),
    )


def data_sources(config: RunConfig, rank: int, world_size: int) -> DataSources:
    train_set = TokenDataset(config.data.path, "train")
    loader = PackedLoader(train_set, config.data.micro_batch_size, SEQ_LEN, seed=0, rank=rank, world_size=world_size)
    val = list(eval_batches(TokenDataset(config.data.path, "val"), 2, SEQ_LEN, max_batches=1))
    return DataSources(loader, val)


def train_worker(rank: int, world: int, config_dict: dict) -> dict:
    config = RunConfig.from_dict(config_dict)
    result = train(config, data=data_sources(config, rank, world))
    return {"final_train_loss": result.metrics["final_train_loss"]}


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def tokens_seen(run_dir: Path) -> dict[int, int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["tokens"] for r in records if r["kind"] == "train"}


def test_ranks_take_disjoint_windows_of_the_global_batch(data_dir):
    dataset = TokenDataset(data_dir, "train")
    whole = PackedLoader(dataset, GLOBAL_BATCH, SEQ_LEN, seed=3)
    ranks = [PackedLoader(dataset, GLOBAL_BATCH // 2, SEQ_LEN, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        expected = {tuple(row) for row in next(whole).input_ids.tolist()}
        rows = [tuple(row) for loader in ranks for row in next(loader).input_ids.tolist()]
        assert len(set(rows)) == len(rows), "two ranks read the same window"
        assert set(rows) == expected, "the ranks' batches do not make up the single-process batch"


def test_loader_resumes_at_another_world_size(data_dir):
    dataset = TokenDataset(data_dir, "train")
    ranks = [PackedLoader(dataset, 2, SEQ_LEN, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for loader in ranks:
            next(loader)
    saved = {**ranks[0].state_dict(), "ranks": [loader.state_dict() for loader in ranks]}
    following = [next(loader).input_ids for loader in ranks]

    # Same world size: each rank continues exactly.
    again = PackedLoader(dataset, 2, SEQ_LEN, seed=3, rank=1, world_size=2)
    resume_loader(again, saved)
    assert torch.equal(next(again).input_ids, following[1])

    # One process with the same global batch continues with the windows the two ranks would read.
    single = PackedLoader(dataset, 4, SEQ_LEN, seed=3)
    resume_loader(single, saved)
    expected = {tuple(row) for batch in following for row in batch.tolist()}
    assert {tuple(row) for row in next(single).input_ids.tolist()} == expected

    # A batch size that does not divide the saved position cannot continue the order.
    odd = PackedLoader(dataset, 5, SEQ_LEN, seed=3)
    with pytest.raises(ValueError, match="cannot resume the data order"):
        resume_loader(odd, saved)


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory) -> RunConfig:
    """One process on the global batch of 4 sequences: the reference curve."""
    config = run_config(data_dir, tmp_path_factory.mktemp("runs"), "single", GLOBAL_BATCH, "none")
    train(config, data=data_sources(config, 0, 1))
    return config


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ep"])
def test_trainer_on_two_ranks_then_one(mode, single_run, data_dir, tmp_path):
    single_config = single_run
    expected = train_losses(single_config.run_dir)

    # Two ranks with 2 sequences each.
    config = run_config(data_dir, tmp_path, mode, GLOBAL_BATCH // 2, mode)
    ranks = run_ranks(train_worker, 2, config.to_dict())
    assert ranks[0] == ranks[1]
    losses = train_losses(config.run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert abs(loss - expected[step]) <= LOSS_TOLERANCE, f"step {step}: {loss:.6f} vs one process {expected[step]:.6f}"
    assert tokens_seen(config.run_dir)[STEPS] == STEPS * GLOBAL_BATCH * SEQ_LEN

    checkpoints = list_checkpoints(config.run_dir)
    assert [step for step, _ in checkpoints] == [INTERVAL, STEPS]
    assert all(is_dcp_checkpoint(path) for _, path in checkpoints)
    # model.safetensors contains the whole model, so the single-process tools read it.
    model, _ = load_model(config.run_dir)
    single_model, _ = load_model(single_config.run_dir)
    for name, tensor in single_model.state_dict().items():
        assert model.state_dict()[name].shape == tensor.shape, name
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")

    # Drop the final checkpoint and resume the world-size-2 run in one process from step 4. It
    # keeps the per-rank micro-batch of 2, so the global batch halves, but the data continues
    # where the two ranks stopped and the loss goes on from where it was.
    shutil.rmtree(checkpoints[-1][1])
    train(config, data=data_sources(config, 0, 1))
    resumed = train_losses(config.run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert all(resumed[step] == losses[step] for step in range(1, INTERVAL + 1))
    for step in range(INTERVAL + 1, STEPS + 1):
        assert abs(resumed[step] - losses[step]) < 0.25, f"step {step}: resumed {resumed[step]:.4f}, two ranks {losses[step]:.4f}"
    seen = tokens_seen(config.run_dir)
    assert seen[INTERVAL + 1] - seen[INTERVAL] == 2 * SEQ_LEN
    final = list_checkpoints(config.run_dir)[-1]
    assert final[0] == STEPS
    assert not is_dcp_checkpoint(final[1]), "a single process writes the single-process format"


@pytest.mark.parametrize("mode", ["fsdp", "ep"])
def test_single_process_checkpoint_resumes_on_two_ranks(mode, single_run, data_dir, tmp_path):
    # The single-process run stopped after step 4; two ranks of 2 sequences continue it with the
    # same global batch, so steps 5 to 8 repeat the uninterrupted run.
    config = run_config(data_dir, tmp_path, "scaled", GLOBAL_BATCH // 2, mode)
    shutil.copytree(single_run.run_dir, config.run_dir)
    shutil.rmtree(list_checkpoints(config.run_dir)[-1][1])
    (config.run_dir / "config.json").write_text(json.dumps(config.to_dict()))

    run_ranks(train_worker, 2, config.to_dict())
    expected = train_losses(single_run.run_dir)
    losses = train_losses(config.run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(INTERVAL + 1, STEPS + 1):
        assert abs(losses[step] - expected[step]) <= LOSS_TOLERANCE, f"step {step}: {losses[step]:.6f} vs {expected[step]:.6f}"
