"""Run a function on several CPU processes joined by a gloo process group, and collect what each returns.

The processes are forked from the test process, so they start without importing torch again
(a spawned process spends seconds on that). Each one uses a single intra-op thread, which keeps
two ranks from fighting over the cores and keeps results reproducible.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aoe.model.config import AttentionConfig, FFNConfig, ModelConfig

# A collective that waits longer than this fails the test instead of hanging it.
COLLECTIVE_TIMEOUT_S = 60


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Give the single-process references one intra-op thread, like each forked rank.

    Two ranks and a reference then never compete for the cores, and the reference runs the same
    kernels as the ranks. Test modules import this fixture to use it.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _entry(rank: int, fn: Callable, world_size: int, store: str, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results in rank order."""
    with tempfile.TemporaryDirectory(prefix="aoe-dist-") as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(_entry, args=(fn, world_size, store, tmp, args), nprocs=world_size,
                           join=True, start_method="fork")
        return [torch.load(Path(tmp) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def tiny_model_config(kind: str, n_experts: int = 4) -> ModelConfig:
    """A two-layer model small enough that twenty steps on two CPU processes take a few seconds."""
    # d_wide 40 rather than the matched 39 keeps the rows of every expert matrix 16-byte aligned.
    ffn = FFNConfig(kind=kind, d_ffn=32, n_experts=n_experts, top_k=2, d_low=8 if kind == "aoe" else None,
                    d_wide=40 if kind == "aoe" else None, aux_loss_coef=0.01)
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, max_seq_len=32,
                       attention=AttentionConfig(n_heads=2), ffn=ffn, tie_embeddings=True)
