"""The two-stage toy experiment at a reduced size: its data, its routing measures and its summary."""

import math

import pytest
import torch

from aoe.analysis.toy import (
    NEW_CLASS,
    StageRouting,
    ToyConfig,
    ToyModel,
    ToyResult,
    class_means,
    run_toy,
    sample,
    summarize,
    train_toy,
)

SMALL = ToyConfig(dim=8, hidden=16, d_low=4, steps_per_stage=15, batch_size=64, lr=0.02, eval_points_per_class=100)


def test_class_means_on_circle():
    means = class_means(ToyConfig(dim=5, separation=3.0))
    assert means.shape == (3, 5)
    assert torch.allclose(means.norm(dim=1), torch.full((3,), 3.0))
    assert means[:, 2:].abs().max() == 0
    # 120 degrees apart: every pair has cosine -1/2.
    cosines = (means @ means.t()) / 9.0
    assert torch.allclose(cosines[0, 1], torch.tensor(-0.5), atol=1e-6)
    assert torch.allclose(cosines[1, 2], torch.tensor(-0.5), atol=1e-6)


def test_sample_draws_only_requested_classes():
    x, y = sample(SMALL, [0, 1], 2000, torch.Generator().manual_seed(0))
    assert set(y.tolist()) == {0, 1}
    # Each class's empirical mean is within a few standard errors of its true mean.
    for c in (0, 1):
        error = (x[y == c].mean(dim=0) - class_means(SMALL)[c]).abs().max()
        assert error < 0.15


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_selected_expert_matches_layer_routing(kind):
    torch.manual_seed(0)
    model = ToyModel(SMALL, kind)
    x, _ = sample(SMALL, [0, 1, 2], 500, torch.Generator().manual_seed(1))
    _, routing = model.ffn(x)
    counts = torch.bincount(model.selected_expert(x), minlength=2).float()
    assert torch.equal(routing.stats.tokens_per_expert, counts)


def test_moe_and_aoe_have_matched_parameters():
    moe = sum(p.numel() for p in ToyModel(SMALL, "moe").ffn.experts.parameters())
    aoe = sum(p.numel() for p in ToyModel(SMALL, "aoe").ffn.experts.parameters())
    # Eq. 5 rounded to an integer and then to a multiple of 4 is within 2.5 width units
    # (d_low + 2 * dim parameters each) of the MoE expert, for each of the two experts.
    width_unit = SMALL.d_low + 2 * SMALL.dim
    assert abs(moe - aoe) <= 2 * 2.5 * width_unit


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_run_toy_measures_consistent_fractions(kind):
    model, result = train_toy(kind, seed=0, config=SMALL, history_every=5)
    for stage in (result.stage1, result.stage2):
        for shares in stage.fractions:
            assert sum(shares) == pytest.approx(1.0)
    assert 0.5 <= result.concentration <= 1.0
    assert result.concentration == max(result.stage2.fractions[NEW_CLASS])
    # 15 stage-2 steps logged every 5 steps (0, 5, 10), plus the last step.
    assert len(result.new_class_history) == 4
    assert result.new_class_history[-1] == pytest.approx(result.concentration)
    # Stage 1 never trains on class 2, so only stage 2 can teach the classifier that class.
    assert result.stage2.accuracy[NEW_CLASS] > result.stage1.accuracy[NEW_CLASS]
    assert isinstance(model, ToyModel)


def test_run_toy_is_deterministic():
    a = run_toy("moe", seed=3, config=SMALL)
    b = run_toy("moe", seed=3, config=SMALL)
    assert a.stage2.fractions == b.stage2.fractions


def _result(kind, stage1_old, new_share):
    stage1 = StageRouting([stage1_old[0], stage1_old[1], [0.5, 0.5]], [1.0, 1.0, 0.0])
    stage2 = StageRouting([stage1_old[0], stage1_old[1], new_share], [1.0, 1.0, 1.0])
    return ToyResult(kind, 0, stage1, stage2)


def test_summary_statistics_by_hand():
    results = [
        # old classes mostly on expert 0 (expert 1 idle); the new class goes to expert 1
        _result("aoe", [[1.0, 0.0], [0.8, 0.2]], [0.05, 0.95]),
        # balanced stage 1 (no idle expert) and an evenly split new class
        _result("aoe", [[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),
        # expert 1 idle, but the new class joins the busy expert 0
        _result("moe", [[1.0, 0.0], [0.8, 0.2]], [0.7, 0.3]),
    ]
    assert results[0].stage1_load == pytest.approx([0.9, 0.1])
    assert results[0].idle_expert == 1
    assert results[0].to_idle_expert is True
    assert results[1].idle_expert is None
    assert results[1].to_idle_expert is None
    assert results[2].to_idle_expert is False
    summary = summarize(results)
    assert summary["aoe"]["concentration_mean"] == pytest.approx(0.725)
    assert summary["aoe"]["concentration_std"] == pytest.approx(math.sqrt(2 * 0.225**2))
    assert summary["aoe"]["taken_by_one_expert"] == 0.5
    assert summary["aoe"]["seeds_with_idle_expert"] == 1
    assert summary["aoe"]["to_idle_expert"] == 1.0
    assert summary["moe"]["concentration_mean"] == pytest.approx(0.7)
    assert summary["moe"]["to_idle_expert"] == 0.0


def test_invalid_toy_config_raises():
    with pytest.raises(ValueError, match="toy.d_low"):
        ToyConfig(dim=4, d_low=4)
    with pytest.raises(ValueError, match="expected 'moe' or 'aoe'"):
        SMALL.ffn_config("dense")
