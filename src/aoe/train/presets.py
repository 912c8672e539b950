"""Run presets: functions that return a complete ``RunConfig``.

The ``paper-*`` presets follow the pre-training recipe of the AoE paper (Lv et al., ICML 2025).
AdamW uses betas (0.9, 0.95), weight decay 0.1 and gradient clipping 1.0. The peak LR is 2e-4
(3.2e-4 for the 4B models), with 4,800 linear warm-up steps and cosine decay to 1.28e-5.
Batches hold 4.2M tokens, and training sees 100B tokens. A batch here is
2048 sequences of 2048 tokens (4,194,304 tokens, written as micro-batch 8 x 256 accumulation
steps on one device), so 100B tokens take 23,842 steps. Their data path is a placeholder to
override (``data.path=...``).

The ``tiny-*`` presets train CPU-scale models (``aoe.model.presets.tiny``) in minutes.
"""

from __future__ import annotations

import difflib
from typing import Callable

from aoe.model.config import ModelConfig
from aoe.model.presets import PAPER_D_LOWS, paper_4b, paper_732m, tiny
from aoe.train.config import (
    CheckpointConfig,
    DataConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)

PAPER_SEQ_LEN = 2048
PAPER_SEQUENCES_PER_STEP = 2048
PAPER_TOKENS = 100_000_000_000
PAPER_MAX_STEPS = PAPER_TOKENS // (PAPER_SEQ_LEN * PAPER_SEQUENCES_PER_STEP)


def paper_run(name: str, model: ModelConfig, lr: float = 2e-4) -> RunConfig:
    """Wrap ``model`` in the paper's pre-training recipe."""
    micro_batch = 8
    return RunConfig(
        name=name,
        model=model,
        data=DataConfig(path="data/redpajama", seq_len=PAPER_SEQ_LEN, micro_batch_size=micro_batch,
                        grad_accum_steps=PAPER_SEQUENCES_PER_STEP // micro_batch),
        optim=OptimConfig(lr=lr, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleConfig(warmup_steps=4800, max_steps=PAPER_MAX_STEPS, min_lr=1.28e-5),
        train=TrainConfig(precision="bf16", device="auto", log_interval=10, eval_interval=1000, eval_batches=50),
        checkpoint=CheckpointConfig(interval=1000, keep_last=3),
    )


def tiny_run(name: str, model: ModelConfig) -> RunConfig:
    """Wrap ``model`` in a CPU-scale run: seq_len 128, 8 sequences per step, 600 steps, fp32."""
    return RunConfig(
        name=name,
        model=model,
        data=DataConfig(path="data/tiny", seq_len=128, micro_batch_size=8, grad_accum_steps=1),
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleConfig(warmup_steps=60, max_steps=600, min_lr=1e-4),
        train=TrainConfig(precision="fp32", device="cpu", log_interval=20, eval_interval=100, eval_batches=20),
        checkpoint=CheckpointConfig(interval=100, keep_last=2),
    )


RUN_PRESETS: dict[str, Callable[[], RunConfig]] = {
    "paper-732m-moe": lambda: paper_run("paper-732m-moe", paper_732m("moe")),
    **{f"paper-732m-aoe-dlow{d}": (lambda d=d: paper_run(f"paper-732m-aoe-dlow{d}", paper_732m("aoe", d_low=d)))
       for d in PAPER_D_LOWS},
    "paper-4b-moe": lambda: paper_run("paper-4b-moe", paper_4b("moe"), lr=3.2e-4),
    "paper-4b-aoe": lambda: paper_run("paper-4b-aoe", paper_4b("aoe"), lr=3.2e-4),
    "tiny-moe": lambda: tiny_run("tiny-moe", tiny("moe")),
    "tiny-aoe": lambda: tiny_run("tiny-aoe", tiny("aoe")),
    "tiny-dense": lambda: tiny_run("tiny-dense", tiny("dense")),
}


def run_preset(name: str) -> RunConfig:
    """Return a fresh RunConfig for the preset ``name``."""
    if name not in RUN_PRESETS:
        close = difflib.get_close_matches(name, list(RUN_PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown run preset {name!r}{hint} (known: {', '.join(RUN_PRESETS)}; "
                         "or give a .yaml/.json config file)")
    return RUN_PRESETS[name]()
