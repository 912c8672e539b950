"""Selection variants (top-P, expert choice), AoE score norms and the two control layers."""

from __future__ import annotations

import math

import pytest
import torch

from aoe.layers.moe import AoE, MoE, build_ffn
from aoe.layers.routing import activation_norms, expert_capacity, select_expert_choice, select_top_p
from aoe.model.config import FFNConfig, large_router_hidden

D_MODEL = 16
N_EXPERTS = 4


def make_layer(kind: str, seed: int = 0, **changes):
    torch.manual_seed(seed)
    d_low = changes.pop("d_low", 6 if kind == "aoe" else None)
    config = FFNConfig(kind=kind, d_ffn=24, n_experts=N_EXPERTS, top_k=2, d_low=d_low, **changes)
    return build_ffn(config, D_MODEL, init_std=0.3)


# ----- expert choice -----------------------------------------------------------------------


def test_expert_choice_fills_capacity():
    torch.manual_seed(0)
    scores = torch.randn(16, N_EXPERTS)
    selection = select_expert_choice(scores, capacity_factor=2.0)

    # capacity = 2.0 * 16 / 4 = 8 tokens per expert
    assert expert_capacity(16, N_EXPERTS, 2.0) == 8
    assert selection.mask_TE.sum(dim=0).tolist() == [8] * N_EXPERTS
    # Each expert keeps its 8 highest-scoring tokens.
    for e in range(N_EXPERTS):
        chosen = set(selection.token_idx[selection.expert_idx == e].tolist())
        assert chosen == set(scores[:, e].topk(8).indices.tolist())
    # Weights are softmax(all scores) of the token, at the choosing expert.
    probs = torch.softmax(scores, dim=-1)
    torch.testing.assert_close(selection.weight, probs[selection.token_idx, selection.expert_idx])


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_expert_choice_unchosen_tokens_zero(kind):
    layer = make_layer(kind, selection="expert_choice", capacity_factor=0.5)
    torch.manual_seed(1)
    x = torch.randn(16, D_MODEL)

    out, routing = layer(x)
    scores, _ = layer.scores(x)
    mask = select_expert_choice(scores, 0.5).mask_TE
    unchosen = ~mask.any(dim=-1)

    # capacity = 0.5 * 16 / 4 = 2, so at most 8 of the 16 tokens are chosen.
    assert routing.stats.tokens_per_expert.tolist() == [2.0] * N_EXPERTS
    assert int(unchosen.sum()) >= 8
    assert bool((out[unchosen] == 0).all())
    assert bool((out[~unchosen].abs().sum(dim=-1) > 0).all())
    # Expert choice balances by construction and adds no auxiliary loss.
    assert float(routing.aux_loss) == 0.0


def test_expert_choice_skips_padding():
    torch.manual_seed(2)
    scores = torch.randn(12, N_EXPERTS)
    valid = torch.ones(12, dtype=torch.bool)
    valid[[0, 1, 5, 11]] = False
    # Padding positions get the highest scores, so they would win without the mask.
    scores[~valid] += 100.0
    selection = select_expert_choice(scores, capacity_factor=2.0, valid_T=valid)

    assert not bool(selection.mask_TE[~valid].any())
    # Capacity counts only the 8 valid tokens: 2.0 * 8 / 4 = 4.
    assert selection.mask_TE.sum(dim=0).tolist() == [4] * N_EXPERTS


def test_expert_choice_all_padding_selects_nothing():
    scores = torch.randn(6, N_EXPERTS)
    selection = select_expert_choice(scores, capacity_factor=2.0, valid_T=torch.zeros(6, dtype=torch.bool))

    assert int(selection.mask_TE.sum()) == 0
    assert selection.token_idx.numel() == 0

    layer = make_layer("aoe", selection="expert_choice")
    out, routing = layer(torch.randn(6, D_MODEL), torch.zeros(6, dtype=torch.bool))
    assert bool((out == 0).all())
    assert float(routing.stats.tokens_per_expert.sum()) == 0.0


def test_expert_choice_ties_earliest_tokens():
    selection = select_expert_choice(torch.zeros(8, N_EXPERTS), capacity_factor=2.0)

    for e in range(N_EXPERTS):
        assert selection.token_idx[selection.expert_idx == e].tolist() == [0, 1, 2, 3]


# ----- top-P -------------------------------------------------------------------------------


def test_top_p_pinned_example():
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    selection = select_top_p(scores, p=0.6)

    # Mass before experts 0, 1, 2: 0, 0.5, 0.8. Expert 1 crosses 0.6 and is included.
    assert selection.expert_idx.tolist() == [0, 1]
    torch.testing.assert_close(selection.weight, torch.tensor([0.625, 0.375]))


def test_top_p_one_selects_all():
    torch.manual_seed(3)
    scores = torch.randn(20, N_EXPERTS) * 2
    selection = select_top_p(scores, p=1.0)

    assert bool(selection.mask_TE.all())
    torch.testing.assert_close(selection.weight, torch.softmax(scores, dim=-1).reshape(-1))
    # A confident token whose other probabilities fall below fp32 resolution next to 1.0.
    confident = select_top_p(torch.tensor([[20.0, 0.0, 0.0, 0.0]]), p=1.0)
    assert confident.mask_TE.tolist() == [[True, True, True, True]]


def test_top_p_tiny_selects_argmax():
    torch.manual_seed(4)
    scores = torch.randn(20, N_EXPERTS)
    selection = select_top_p(scores, p=1e-6)

    assert selection.mask_TE.sum(dim=-1).tolist() == [1] * 20
    assert torch.equal(selection.expert_idx, scores.argmax(dim=-1))
    torch.testing.assert_close(selection.weight, torch.ones(20))


def test_top_p_weights_sum_to_one():
    torch.manual_seed(5)
    scores = torch.randn(30, N_EXPERTS) * 1.5
    selection = select_top_p(scores, p=0.6)
    weight_sums = torch.zeros(30).index_add(0, selection.token_idx, selection.weight)
    counts = selection.mask_TE.sum(dim=-1)

    torch.testing.assert_close(weight_sums, torch.ones(30))
    # The scale 1.5 makes both one-expert and multi-expert tokens appear.
    assert int((counts == 1).sum()) > 0
    assert int((counts > 1).sum()) > 0


def test_top_p_layer_adds_entropy_loss():
    layer = make_layer("aoe", selection="top_p", top_p=0.6, aux_loss_coef=0.01, entropy_loss_coef=0.5)
    torch.manual_seed(6)
    x = torch.randn(10, D_MODEL)

    _, routing = layer(x)
    scores, _ = layer.scores(x)
    log_probs = torch.log_softmax(scores, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1).mean()

    expected = 0.01 * routing.load_balancing_loss + 0.5 * entropy
    torch.testing.assert_close(routing.aux_loss, expected)


# ----- AoE score norms ---------------------------------------------------------------------


@pytest.mark.parametrize("norm,order", [("l2", 2), ("l1", 1), ("linf", math.inf)])
def test_aoe_score_norm_matches_linalg(norm, order):
    layer = make_layer("aoe", score_norm=norm)
    torch.manual_seed(7)
    x = torch.randn(9, D_MODEL)

    scores, cache = layer.scores(x)
    # The cache written out expert by expert: C_e = x W_down^e, shape (T, L).
    expected_cache = torch.stack([x @ layer.experts.w_gate_down[:, e] for e in range(N_EXPERTS)], dim=1)

    torch.testing.assert_close(cache, expected_cache, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, torch.linalg.vector_norm(expected_cache, ord=order, dim=-1),
                               rtol=1e-5, atol=1e-6)


def test_score_norms_rank_differently():
    # One cache where l1, l2 and linf each pick a different expert, so a swapped norm fails.
    cache = torch.tensor([[[3.0, 0.0, 0.0], [2.6, 1.8, 0.0], [1.6, 1.6, 1.6]]])
    winners = {norm: int(activation_norms(cache, norm).argmax()) for norm in ("linf", "l2", "l1")}

    assert winners["linf"] == 0
    assert winners["l2"] == 1
    assert winners["l1"] == 2


# ----- control layers ----------------------------------------------------------------------


@pytest.mark.parametrize("d_model,n_experts,d_low", [(16, 4, 6), (768, 8, 128), (1280, 8, 400)])
def test_large_router_matches_low_rank_budget(d_model, n_experts, d_low):
    hidden = large_router_hidden(d_model, n_experts, d_low)
    target = n_experts * d_low * d_model

    assert hidden == round(target / (d_model + n_experts))
    # Rounding H moves the count by at most half of one hidden unit, (D + E) / 2.
    assert abs(hidden * (d_model + n_experts) - target) <= (d_model + n_experts) / 2


def test_large_router_layer_counts():
    layer = make_layer("moe", router="large", router_match_d_low=6)
    hidden = round(N_EXPERTS * 6 * D_MODEL / (D_MODEL + N_EXPERTS))
    router_params = sum(p.numel() for p in layer.router.parameters())

    assert isinstance(layer, MoE)
    assert hidden == 19
    assert router_params == hidden * (D_MODEL + N_EXPERTS)
    assert abs(router_params - N_EXPERTS * 6 * D_MODEL) <= (D_MODEL + N_EXPERTS) / 2
    assert sum(p.numel() for p in layer.parameters()) == layer.config.num_params(D_MODEL)


@pytest.mark.parametrize("d_low", [4, 6, 10])
def test_factorised_moe_expert_matches_plain(d_low):
    plain = make_layer("moe")
    factorised = make_layer("moe", d_low=d_low)
    aoe = make_layer("aoe", d_low=d_low)
    per_expert = [sum(p.numel() for p in layer.experts.parameters()) // N_EXPERTS
                  for layer in (plain, factorised, aoe)]

    assert isinstance(aoe, AoE)
    assert per_expert[0] == 3 * D_MODEL * 24
    # d_wide is rounded to an integer, so the count can miss by half a hidden unit of W_up, W_p, W_o.
    assert abs(per_expert[1] - per_expert[0]) <= (d_low + 2 * D_MODEL) / 2
    assert per_expert[1] == per_expert[2]
    assert factorised.experts.hidden == aoe.experts.hidden
