"""The grid presets of the AoE paper (Lv et al., ICML 2025): its rows, their sizes and run recipes."""

import pytest

from aoe.analysis import grid
from aoe.analysis.grid import GRID, default_grid, grid_entry, grid_model, grid_run, scaled_d_low

PAPER_TOTAL = 732e6
PAPER_ACTIVE = 247e6


def test_grid_has_every_paper_row():
    table2 = [e.name for e in GRID.values() if e.table == "Table 2"]
    table3 = [e.name for e in GRID.values() if e.table == "Table 3"]
    assert len(table2) == 12
    assert len(table3) == 4
    assert "dense" in GRID
    for d_low in (64, 128, 256, 512):
        assert f"aoe-dlow{d_low}" in table2
        assert f"aoe-dlow{d_low}-laux" in table2


@pytest.mark.parametrize("name", ["moe", "moe-laux", "moe-laux-factorized-wg", "aoe-dlow64", "aoe-dlow128-laux",
                                  "aoe-dlow256-laux", "aoe-dlow512", "moe-top-p", "aoe-dlow256-expert-choice"])
def test_paper_scale_counts_match_paper(name):
    model = grid_model(name, "paper")
    # Lv et al. state 732M total and 247M active parameters for every Table 2/3 model.
    assert abs(model.num_params() - PAPER_TOTAL) / PAPER_TOTAL < 0.001
    assert abs(model.num_active_params() - PAPER_ACTIVE) / PAPER_ACTIVE < 0.002


def test_paper_aoe_widths_match_eq5():
    # d_wide from Eq. 5 at d_model 768, d_ffn 3072: 4392.96, 4194.46, 3840, 3264.
    widths = {d: grid_model(f"aoe-dlow{d}", "paper").ffn.expert_width(768) for d in (64, 128, 256, 512)}
    assert widths == {64: 4393, 128: 4194, 256: 3840, 512: 3264}


def test_paper_large_router_size():
    model = grid_model("moe-laux-large-router", "paper")
    assert model.ffn.router_hidden_width(768) == 1012
    # The router has about n * d_low * d_model = 8 * 128 * 768 parameters per layer.
    assert model.ffn.router_params(768) == 768 * 1012 + 1012 * 8
    assert abs(model.ffn.router_params(768) - 8 * 128 * 768) / (8 * 128 * 768) < 0.002
    extra = model.num_params() - grid_model("moe-laux", "paper").num_params()
    assert extra == 12 * (768 * 1012 + 1012 * 8 - 768 * 8)


def test_factorized_gate_control_is_exactly_matched():
    control = grid_model("moe-laux-factorized-wg", "paper")
    assert control.ffn.kind == "moe"
    assert control.ffn.d_low == 256
    assert control.num_params() == grid_model("moe-laux", "paper").num_params()


def test_dense_baseline_matches_active_params():
    dense = grid_model("dense", "paper")
    moe = grid_model("moe-laux", "paper")
    assert dense.ffn.d_ffn == 6144
    # Equal up to the MoE router (12 layers x 768 x 8).
    assert moe.num_active_params() - dense.num_active_params() == 12 * 768 * 8
    cpu_dense, cpu_moe = grid_model("dense", "cpu"), grid_model("moe-laux", "cpu")
    assert cpu_moe.num_active_params() - cpu_dense.num_active_params() == 4 * 64 * 8


def test_loss_and_selection_settings():
    assert grid_model("moe", "cpu").ffn.aux_loss_coef == 0.0
    assert grid_model("moe-laux", "cpu").ffn.aux_loss_coef == 0.01
    assert grid_model("aoe-dlow64", "cpu").ffn.aux_loss_coef == 0.0
    top_p = grid_model("aoe-dlow256-top-p", "cpu").ffn
    assert (top_p.selection, top_p.top_p, top_p.entropy_loss_coef) == ("top_p", 0.6, 1e-4)
    choice = grid_model("moe-expert-choice", "cpu").ffn
    assert (choice.selection, choice.capacity_factor, choice.aux_loss_coef) == ("expert_choice", 2.0, 0.0)


def test_cpu_scale_keeps_paper_ratios():
    assert [scaled_d_low(d, 128) for d in (64, 128, 256, 512)] == [11, 21, 43, 85]
    # The CPU grid rounds to multiples of 4 (16-byte fp32 rows).
    assert [scaled_d_low(d, 64, 4) for d in (64, 128, 256, 512)] == [4, 12, 20, 44]
    for name in ("aoe-dlow64", "aoe-dlow128", "aoe-dlow256", "aoe-dlow512", "moe-laux-factorized-wg"):
        ffn = grid_model(name, "cpu").ffn
        assert ffn.d_low % 4 == 0
        assert ffn.expert_width(64) % 4 == 0
    base = grid_model("moe-laux", "cpu")
    assert (base.d_model, base.n_layers, base.ffn.n_experts, base.ffn.top_k) == (64, 4, 8, 2)
    for name in ("aoe-dlow64", "aoe-dlow256-laux", "aoe-dlow512-laux", "moe-laux-factorized-wg"):
        model = grid_model(name, "cpu")
        # Rounding d_wide to an integer and then to a multiple of 4 leaves each expert within
        # 2.5 width units (d_low + 2 * d_model parameters each) of the MoE expert.
        per_expert = abs(model.ffn.expert_params(64) - base.ffn.expert_params(64))
        assert per_expert <= 2.5 * (model.ffn.d_low + 2 * 64), name
    router = grid_model("moe-laux-large-router", "cpu").ffn
    assert abs(router.router_params(64) - 8 * 12 * 64) / (8 * 12 * 64) < 0.01


def test_default_grid_runs():
    plan = default_grid()
    assert sum(seeds for _, seeds in plan) == 21
    assert dict(plan)[grid.HEADLINE_MOE] == 3
    assert dict(plan)[grid.HEADLINE_AOE] == 3


def test_grid_run_fixes_data_order():
    a = grid_run("moe-laux", 0, data_path="d", out_dir="o", vocab_size=300)
    b = grid_run("aoe-dlow256-laux", 2, data_path="d", out_dir="o", vocab_size=300)
    assert a.data.seed == b.data.seed
    assert (a.train.seed, b.train.seed) == (0, 2)
    assert a.model.vocab_size == 300
    assert a.data.tokens_per_step * a.schedule.max_steps == 153_600
    assert str(b.run_dir) == "o/aoe-dlow256-laux-seed2"
    paper = grid_run("aoe-dlow256-laux", 1, scale="paper", data_path="d")
    assert paper.data.tokens_per_step == 2048 * 2048
    assert paper.optim.lr == 2e-4


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="did you mean 'moe-laux'"):
        grid_entry("moe-lax")
    with pytest.raises(ValueError, match="invalid scale"):
        grid_model("moe", "gpu")
