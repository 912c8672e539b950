"""The LR schedule: linear warm-up, cosine decay, min_lr floor."""

from __future__ import annotations

import math

import pytest

from aoe.train.config import ScheduleConfig
from aoe.train.schedule import lr_at

PEAK = 2e-4
SCHEDULE = ScheduleConfig(warmup_steps=4800, max_steps=23841, min_lr=1.28e-5)


def test_first_step_lr_is_positive():
    assert lr_at(0, PEAK, SCHEDULE) == pytest.approx(PEAK / 4800)


def test_warmup_is_linear_and_peaks_at_its_end():
    assert lr_at(2399, PEAK, SCHEDULE) == pytest.approx(PEAK * 2400 / 4800)
    assert lr_at(4799, PEAK, SCHEDULE) == pytest.approx(PEAK)
    assert lr_at(4800, PEAK, SCHEDULE) == pytest.approx(PEAK)
    lrs = [lr_at(s, PEAK, SCHEDULE) for s in range(4800)]
    assert all(b > a for a, b in zip(lrs, lrs[1:]))


def test_cosine_midpoint_and_end():
    middle = 4800 + (23841 - 4800) // 2
    expected = 1.28e-5 + (PEAK - 1.28e-5) * 0.5 * (1 + math.cos(math.pi * (middle - 4800) / (23841 - 4800)))
    assert lr_at(middle, PEAK, SCHEDULE) == pytest.approx(expected)
    assert lr_at(middle, PEAK, SCHEDULE) == pytest.approx((PEAK + 1.28e-5) / 2, rel=1e-3)
    assert lr_at(23841, PEAK, SCHEDULE) == pytest.approx(1.28e-5)


def test_never_below_min_lr_after_warmup():
    lrs = [lr_at(s, PEAK, SCHEDULE) for s in range(4800, 30000, 7)]
    assert min(lrs) >= 1.28e-5
    assert max(lrs) <= PEAK * (1 + 1e-12)
    assert lr_at(10**6, PEAK, SCHEDULE) == 1.28e-5


def test_decay_is_monotone_after_warmup():
    lrs = [lr_at(s, PEAK, SCHEDULE) for s in range(4800, 23842)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))


def test_no_warmup_starts_at_peak():
    schedule = ScheduleConfig(warmup_steps=0, max_steps=10, min_lr=0.0)
    assert lr_at(0, 1e-3, schedule) == pytest.approx(1e-3)
    assert lr_at(10, 1e-3, schedule) == 0.0
