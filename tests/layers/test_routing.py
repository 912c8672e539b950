"""Selection functions, gate weights, the load-balancing loss, tie-breaking and fp32 scores."""

from __future__ import annotations

import math

import pytest
import torch

from aoe.layers.moe import build_ffn
from aoe.layers.routing import load_balancing_loss, select_top_k
from aoe.model.config import FFNConfig

D_MODEL = 16
N_EXPERTS = 4


def make_layer(kind: str, seed: int = 0, **changes):
    torch.manual_seed(seed)
    d_low = 6 if kind == "aoe" else changes.pop("d_low", None)
    config = FFNConfig(kind=kind, d_ffn=24, n_experts=N_EXPERTS, top_k=2, d_low=d_low, **changes)
    return build_ffn(config, D_MODEL, init_std=0.3)


# ----- gate weights ------------------------------------------------------------------------


def test_gate_weights_top2_pinned():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    selection = select_top_k(scores, k=2)

    assert selection.expert_idx.tolist() == [0, 1]
    # softmax([2, 1]) = [e/(e+1), 1/(e+1)]
    torch.testing.assert_close(selection.weight, torch.tensor([0.7311, 0.2689]), rtol=0, atol=1e-4)
    assert selection.weight.dtype == torch.float32


def test_gate_weights_top1_softmax_over_all():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    selection = select_top_k(scores, k=1)
    expected = math.exp(2) / sum(math.exp(s) for s in (2, 1, 0, -1))

    assert selection.expert_idx.tolist() == [0]
    assert float(selection.weight) == pytest.approx(expected, rel=1e-6)
    assert float(selection.weight) == pytest.approx(0.6439, abs=1e-4)


def test_gate_weights_softmax_all_keeps_mass():
    torch.manual_seed(0)
    scores = torch.randn(10, N_EXPERTS) * 2
    selection = select_top_k(scores, k=2, normalization="top_k_softmax_all")
    weight_sums = torch.zeros(10).index_add(0, selection.token_idx, selection.weight)
    selected_mass = (torch.softmax(scores, dim=-1) * selection.mask_TE).sum(dim=-1)

    torch.testing.assert_close(weight_sums, selected_mass)
    assert bool((weight_sums < 1).all())
    # Pinned: softmax([2, 1, 0, -1]) at experts 0 and 1.
    pinned = select_top_k(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), k=2, normalization="top_k_softmax_all")
    torch.testing.assert_close(pinned.weight, torch.tensor([0.6439, 0.2369]), rtol=0, atol=1e-4)


def test_gate_normalization_rejects_unknown():
    with pytest.raises(ValueError, match="softmax_top_k"):
        select_top_k(torch.zeros(2, N_EXPERTS), k=2, normalization="sparsemax")


# ----- load-balancing loss -----------------------------------------------------------------
# Convention: L_aux / alpha = E * sum_i f_i * P_i, with f_i = (tokens sent to expert i) / T,
# not / (T*K). Uniform top-K routing gives exactly K; every token on the same expert with
# confident scores gives E.


def uniform_top_k_mask(num_tokens: int, k: int) -> torch.Tensor:
    """Token t takes experts t, t+1, ..., t+k-1 (mod E), so every expert gets T*K/E tokens."""
    mask = torch.zeros(num_tokens, N_EXPERTS, dtype=torch.bool)
    for t in range(num_tokens):
        for j in range(k):
            mask[t, (t + j) % N_EXPERTS] = True
    return mask


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balance_loss_uniform_equals_k(k):
    scores = torch.zeros(8, N_EXPERTS)
    loss = load_balancing_loss(scores, uniform_top_k_mask(8, k))

    assert float(loss) == pytest.approx(float(k), abs=1e-6)


def test_balance_loss_collapsed_equals_e():
    scores = torch.tensor([[20.0, 0.0, 0.0, 0.0]]).repeat(8, 1)
    selection = select_top_k(scores, k=1)
    loss = load_balancing_loss(scores, selection.mask_TE)

    assert selection.mask_TE[:, 0].all()
    assert float(loss) == pytest.approx(N_EXPERTS, abs=1e-6)
    assert float(loss) > 1.0 + 1e-3  # the uniform top-1 value


def test_balance_loss_pooled_layers_cancel():
    # Why the loss must be taken per layer: two layers collapsed onto different experts each
    # score E, but pooled into one (2T, E) batch they look balanced over two experts.
    layer_a = torch.tensor([[20.0, 0.0, 0.0, 0.0]]).repeat(8, 1)
    layer_b = torch.tensor([[0.0, 20.0, 0.0, 0.0]]).repeat(8, 1)
    per_layer = sum(float(load_balancing_loss(s, select_top_k(s, 1).mask_TE)) for s in (layer_a, layer_b))
    pooled_scores = torch.cat([layer_a, layer_b])
    pooled = float(load_balancing_loss(pooled_scores, select_top_k(pooled_scores, 1).mask_TE))

    assert per_layer == pytest.approx(2 * N_EXPERTS, abs=1e-5)
    assert pooled == pytest.approx(2.0, abs=1e-5)


def test_balance_loss_ignores_padding_rows():
    torch.manual_seed(1)
    scores = torch.randn(6, N_EXPERTS)
    padding = torch.randn(5, N_EXPERTS) * 10
    mask = select_top_k(scores, 2).mask_TE
    padded_scores = torch.cat([padding[:3], scores, padding[3:]])
    padded_mask = select_top_k(padded_scores, 2).mask_TE
    valid = torch.tensor([False] * 3 + [True] * 6 + [False] * 2)

    expected = load_balancing_loss(scores, mask)
    torch.testing.assert_close(load_balancing_loss(padded_scores, padded_mask, valid), expected)
    assert abs(float(load_balancing_loss(padded_scores, padded_mask)) - float(expected)) > 1e-3


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_layer_balance_loss_ignores_padding(kind):
    layer = make_layer(kind, aux_loss_coef=0.01)
    torch.manual_seed(2)
    x = torch.randn(2, 5, D_MODEL)
    # Two padding positions in front of every row, holding large junk activations.
    junk = torch.randn(2, 2, D_MODEL) * 50
    padded = torch.cat([junk, x], dim=1)
    valid = torch.cat([torch.zeros(2, 2, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)], dim=1)

    out, routing = layer(x)
    padded_out, padded_routing = layer(padded, valid)

    torch.testing.assert_close(padded_out[:, 2:], out)
    torch.testing.assert_close(padded_routing.load_balancing_loss, routing.load_balancing_loss)
    torch.testing.assert_close(padded_routing.aux_loss, routing.aux_loss)
    assert padded_routing.stats.num_tokens == 10
    torch.testing.assert_close(padded_routing.stats.tokens_per_expert, routing.stats.tokens_per_expert)
    torch.testing.assert_close(padded_routing.stats.score_sum, routing.stats.score_sum)
    torch.testing.assert_close(padded_routing.aux_loss, 0.01 * padded_routing.load_balancing_loss)


# ----- ties --------------------------------------------------------------------------------


def test_ties_zero_logits_lowest_index():
    layer = make_layer("moe")
    with torch.no_grad():
        layer.router.weight.zero_()
    torch.manual_seed(3)
    x = torch.randn(7, D_MODEL)

    runs = [layer.select(layer.scores(x)[0], None) for _ in range(3)]

    assert runs[0].expert_idx.view(7, 2).tolist() == [[0, 1]] * 7
    torch.testing.assert_close(runs[0].weight, torch.full((14,), 0.5))
    for run in runs[1:]:
        assert torch.equal(run.expert_idx, runs[0].expert_idx)
        assert torch.equal(run.weight, runs[0].weight)


def test_ties_equal_norms_lowest_index():
    layer = make_layer("aoe")
    with torch.no_grad():
        # Every expert gets expert 2's W_down, so all E norms of a token are equal.
        layer.experts.w_gate_down.copy_(layer.experts.w_gate_down[:, 2:3].expand_as(layer.experts.w_gate_down))
    torch.manual_seed(4)
    x = torch.randn(7, D_MODEL)

    norms, _ = layer.scores(x)
    runs = [layer.select(layer.scores(x)[0], None) for _ in range(3)]

    assert bool((norms == norms[:, :1]).all()), "the premise failed: norms are not exactly equal"
    assert runs[0].expert_idx.view(7, 2).tolist() == [[0, 1]] * 7
    for run in runs[1:]:
        assert torch.equal(run.expert_idx, runs[0].expert_idx)


def test_ties_partial_keep_lowest_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0], [2.0, 2.0, 0.0, 2.0]])
    selection = select_top_k(scores, k=2)

    assert selection.expert_idx.view(2, 2).tolist() == [[1, 2], [0, 1]]


# ----- fp32 scores under autocast ----------------------------------------------------------


@pytest.mark.parametrize("kind,changes", [("moe", {}), ("aoe", {}), ("moe", {"router": "large", "router_match_d_low": 4})],
                         ids=["moe", "aoe", "moe_large_router"])
def test_scores_fp32_under_bf16_autocast(kind, changes):
    layer = make_layer(kind, **changes)
    torch.manual_seed(5)
    x = torch.randn(12, D_MODEL)

    reference_scores, _ = layer.scores(x)
    reference = layer.select(reference_scores, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _ = layer.scores(x)
        selection = layer.select(scores, None)
        _, routing = layer(x)

    assert scores.dtype == torch.float32
    assert selection.weight.dtype == torch.float32
    assert routing.aux_loss.dtype == torch.float32
    torch.testing.assert_close(scores, reference_scores, rtol=0, atol=0)
    assert torch.equal(selection.expert_idx, reference.expert_idx)
    torch.testing.assert_close(routing.stats.tokens_per_expert, reference.mask_TE.float().sum(0))


# ----- routing statistics ------------------------------------------------------------------


def test_routing_stats_uniform_summary():
    from aoe.layers.routing import Selection, routing_stats

    mask = uniform_top_k_mask(8, 2)
    token_idx, expert_idx = mask.nonzero(as_tuple=True)
    selection = Selection(token_idx, expert_idx, torch.full((16,), 0.5), mask)
    stats = routing_stats(torch.zeros(8, N_EXPERTS), selection)
    summary = stats.merge(stats).summary()

    # Uniform load and uniform confidence both have entropy ln(E).
    assert summary["ent_load"] == pytest.approx(math.log(N_EXPERTS), abs=1e-6)
    assert summary["ent_conf"] == pytest.approx(math.log(N_EXPERTS), abs=1e-6)
    assert summary["num_tokens"] == 16.0
    assert summary["load_fraction"] == pytest.approx([0.5] * N_EXPERTS)
    assert summary["experts_per_token"] == [0.0, 0.0, 16.0, 0.0, 0.0]
    assert summary["mean_active_experts"] == pytest.approx(2.0)


def test_routing_stats_skip_padding():
    from aoe.layers.routing import routing_stats

    scores = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    selection = select_top_k(scores, k=1)
    valid = torch.tensor([True, True, False])
    summary = routing_stats(scores, selection, valid).summary()

    assert summary["num_tokens"] == 2.0
    assert summary["load_fraction"] == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert summary["ent_load"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["mean_score"] == pytest.approx([1.5, 1.5, 0.0, 0.0])
    assert summary["experts_per_token"] == [0.0, 2.0, 0.0, 0.0, 0.0]
