"""Parameter counting: the config's arithmetic against built modules and the paper's totals.

Published sizes (Lv et al., 2025, "Autonomy-of-Experts Models"): the small models have 732M
total and 247M active parameters, the scaled-up ones 4B total and 1.18B active.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aoe.model.config import AttentionConfig, FFNConfig, ModelConfig, matched_d_wide
from aoe.model.decoder import Transformer
from aoe.model.presets import MODEL_PRESETS, model_preset


def small_config(tie_embeddings: bool = True, n_kv_heads: int | None = None, **ffn) -> ModelConfig:
    return ModelConfig(vocab_size=97, d_model=32, n_layers=2, max_seq_len=16,
                       attention=AttentionConfig(n_heads=4, n_kv_heads=n_kv_heads),
                       ffn=FFNConfig(**ffn), tie_embeddings=tie_embeddings)


SMALL_CONFIGS = {
    "dense": dict(kind="dense", d_ffn=48),
    "moe": dict(kind="moe", d_ffn=24, n_experts=4, top_k=2),
    "aoe": dict(kind="aoe", d_ffn=24, n_experts=4, top_k=2, d_low=8),
    "moe_factorised": dict(kind="moe", d_ffn=24, n_experts=4, top_k=2, d_low=8),
    "moe_large_router": dict(kind="moe", d_ffn=24, n_experts=4, top_k=2, router="large", router_match_d_low=8),
    "aoe_top1_wide_given": dict(kind="aoe", d_ffn=24, n_experts=4, top_k=1, d_low=5, d_wide=30),
}


def expert_param_count(model: Transformer) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".ffn.experts." in name)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_num_params_matches_built_model(name, tie):
    config = small_config(tie_embeddings=tie, **SMALL_CONFIGS[name])
    torch.manual_seed(0)
    model = Transformer(config)

    assert model.num_params() == config.num_params()
    assert sum(p.numel() for p in model.parameters()) == config.num_params()


def test_num_params_grouped_query_attention():
    config = small_config(n_kv_heads=2, **SMALL_CONFIGS["aoe"])
    model = Transformer(config)

    assert model.layers[0].attn.wk.weight.shape == (16, 32)
    assert model.num_params() == config.num_params()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", ["moe", "aoe", "moe_large_router", "aoe_top1_wide_given"])
def test_active_params_from_built_model(name, tie):
    config = small_config(tie_embeddings=tie, **SMALL_CONFIGS[name])
    model = Transformer(config)
    ffn = config.ffn
    experts = expert_param_count(model)
    # Every token uses all non-expert tensors, K of the E experts, and the embedding table and
    # output head separately, which counts a tied table twice.
    expected = model.num_params() - experts + experts * ffn.top_k // ffn.n_experts
    if tie:
        expected += config.vocab_size * config.d_model

    assert config.num_active_params() == expected


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_presets_match_built_model_on_meta(name):
    config = model_preset(name)
    with torch.device("meta"):
        model = Transformer(config)

    assert model.num_params() == config.num_params()


@pytest.mark.parametrize("name,total,active", [
    ("paper-732m-moe", 732e6, 247e6),
    *[(f"paper-732m-aoe-dlow{d}", 732e6, 247e6) for d in (64, 128, 256, 512)],
    ("paper-4b-moe", 4e9, 1.18e9),
    ("paper-4b-aoe", 4e9, 1.18e9),
])
def test_paper_presets_match_published_sizes(name, total, active):
    config = model_preset(name)

    assert abs(config.num_params() / total - 1) < 0.005
    assert abs(config.num_active_params() / active - 1) < 0.005


def test_paper_732m_pinned_counts():
    moe = model_preset("paper-732m-moe")
    aoe = model_preset("paper-732m-aoe-dlow256")

    assert moe.num_params() == 732_457_728
    assert moe.num_active_params() == 247_425_792
    # AoE has no router: 12 layers * 768 * 8 fewer parameters, with an equal expert size.
    assert moe.num_params() - aoe.num_params() == 12 * 768 * 8
    assert aoe.ffn.expert_params(768) == moe.ffn.expert_params(768) == 3 * 768 * 3072


@pytest.mark.parametrize("d_low,expected", [(64, 4393), (128, 4194), (256, 3840), (512, 3264)])
def test_matched_d_wide_732m(d_low, expected):
    assert matched_d_wide(768, 3072, d_low) == expected


def test_matched_d_wide_exact_value():
    exact = (3 * 768 * 3072 - 64 * 768) / (64 + 2 * 768)

    assert exact == pytest.approx(4392.96)
    assert matched_d_wide(768, 3072, 64, rounding="floor") == 4392
    assert matched_d_wide(768, 3072, 64, rounding="ceil") == 4393


def test_matched_d_wide_4b_and_paper_width():
    moe_expert = 3 * 1280 * 5120

    def aoe_expert(width: int) -> int:
        return 1280 * 400 + 400 * width + 2 * 1280 * width

    # Nearest rounding of 6469.19 gives 6469, but the paper's preset keeps its published 6470.
    assert matched_d_wide(1280, 5120, 400) == 6469
    assert aoe_expert(6469) - moe_expert == -560
    assert aoe_expert(6470) - moe_expert == 2400
    preset = model_preset("paper-4b-aoe")
    assert preset.ffn.expert_width(1280) == 6470
    assert preset.ffn.expert_params(1280) - moe_expert == 2400


def test_matched_d_wide_rejects_bad_input():
    with pytest.raises(ValueError, match="rounding"):
        matched_d_wide(768, 3072, 64, rounding="up")
    with pytest.raises(ValueError, match="d_low"):
        matched_d_wide(16, 1, 40)


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_forward_flops_match_flop_counter(name):
    config = small_config(n_kv_heads=2, **SMALL_CONFIGS[name])
    torch.manual_seed(1)
    model = Transformer(config).eval()
    for block in model.layers:
        # The per-expert loop runs plain matmuls, which the FLOP counter records.
        if hasattr(getattr(block.ffn, "experts", None), "implementation"):
            block.ffn.experts.implementation = "loop"
    batch, seq = 2, 8

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, config.vocab_size, (batch, seq)))
    measured = counter.get_total_flops() / (batch * seq)

    # The counter records the projections, experts, router and head (aten.mm) but not the
    # attention scores inside CPU scaled_dot_product_attention, which the config counts as
    # 2 * D * S per layer for the causal average.
    attention_scores = config.n_layers * 2 * config.d_model * seq
    assert measured == config.forward_flops_per_token(seq) - attention_scores
    assert config.train_flops_per_token(seq) == 3 * config.forward_flops_per_token(seq)
