"""The learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math

from aoe.train.config import ScheduleConfig


def lr_at(step: int, peak_lr: float, schedule: ScheduleConfig) -> float:
    """Return the LR of optimizer step ``step`` (0-based).

    Warm-up rises linearly from peak_lr / warmup_steps at step 0 (never 0, so the first update
    moves the weights) to peak_lr at the last warm-up step. Cosine decay then takes it to
    min_lr at max_steps, and steps past max_steps stay at min_lr. NOTE: only warm-up may go
    below min_lr, because it is linear from near 0 as in the usual recipe.
    """
    warmup, max_steps, min_lr = schedule.warmup_steps, schedule.max_steps, schedule.min_lr
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / max(1, max_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (peak_lr - min_lr) * cosine
