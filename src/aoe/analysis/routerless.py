"""Router-free expert selection in a trained router MoE.

Shape legend:
    T  tokens        D  hidden size      E  experts
    I  expert width  K  experts per token    W  width of the node activation (I, or D for "output")

The experiment tests whether the experts of a trained router MoE "know" which tokens suit them.
Each sparse MoE block's router decision is replaced, without touching a weight:

    node   -> every expert computes its forward pass up to ``node`` for every token
    score  -> each expert's score is the norm (L2, L1 or L-infinity) of its node activation
    select -> the model's own gate rule turns the scores into K experts and their weights
    finish -> the K chosen experts continue from the cached node activation; the rest stop
    combine-> the weighted outputs are summed (plus the shared expert, for Qwen2-MoE)

Expert i is E_i(x) = (SiLU(x W_g) * x W_p) W_o, and the nodes are
    gate      x W_g                 proj   x W_p
    silu_gate SiLU(x W_g)           hidden SiLU(x W_g) * x W_p
    output    E_i(x), the expert's final output (every expert runs in full)
Two reference settings keep the model's structure: ``router`` ranks by the router's own logits
(so the block reproduces the original model) and ``random`` ranks by i.i.d. uniform scores.

Gate rules, applied to the scores exactly as each model applies them to its router logits:
    Mixtral               softmax over all E scores, top-K, renormalise (= softmax over the top K)
    OLMoE, Qwen2/3-MoE    softmax over all E scores, top-K, renormalise only if norm_topk_prob
    PhiMoE                sparsemixer in inference mode (top-2 only): expert 1 is the argmax,
                          its weight the softmax over the scores within a relative margin
                          2*router_jitter_noise of the max; expert 2 likewise with expert 1 masked
    aoe MoE               the layer's own select_top_k with its gate_normalization
"""

from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

NODES = ("gate", "proj", "silu_gate", "hidden", "output")
REFERENCE_NODES = ("router", "random")
NORMS = ("l2", "l1", "linf")
NODE_LABELS = {
    "gate": "xW_g",
    "proj": "xW_p",
    "silu_gate": "SiLU(xW_g)",
    "hidden": "SiLU(xW_g)⊙xW_p",
    "output": "final output",
    "router": "router logits, patched path",
    "random": "random top-K",
}
NORM_ORDERS = {"l2": 2.0, "l1": 1.0, "linf": math.inf}

# (T, E) scores, K -> (weights (T, K), expert indices (T, K))
GateRule = Callable[[Tensor, int], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ExpertWeights:
    """A block's expert weights in (out, in) layout, as views of the model's own parameters."""

    gate: Tensor  # shape: (E, I, D) W_g transposed
    proj: Tensor  # shape: (E, I, D) W_p transposed
    out: Tensor  # shape: (E, D, I) W_o transposed
    act: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class BlockAdapter:
    """The parts of one architecture's sparse MoE block that the router-free forward uses."""

    experts: ExpertWeights
    router_logits: Callable[[Tensor], Tensor]  # x (T, D) -> logits (T, E)
    gate_rule: GateRule
    top_k: int
    shared_expert: Callable[[Tensor], Tensor] | None = None  # x (T, D) -> (T, D), added to the output


# ----- gate rules ----------------------------------------------------------------------------


def softmax_top_k_rule(renormalize: bool) -> GateRule:
    """Softmax over all E scores in fp32, keep the top K, optionally renormalise them to sum 1."""

    def rule(scores_TE: Tensor, k: int) -> tuple[Tensor, Tensor]:
        probs_TE = torch.softmax(scores_TE.float(), dim=-1)
        # shape: (T, K) both; torch.topk like the transformers routers, so ties break the same way
        weight_TK, idx_TK = torch.topk(probs_TE, k, dim=-1)
        if renormalize:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        return weight_TK, idx_TK

    return rule


def phimoe_rule(jitter_eps: float) -> GateRule:
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    def rule(scores_TE: Tensor, k: int) -> tuple[Tensor, Tensor]:
        if k != 2:
            raise NotImplementedError(f"PhiMoE's sparsemixer selects exactly 2 experts, not top_k={k}")
        # NOTE: sparsemixer's margin test divides by |score|, so it is scale-free; with norms
        # (all positive) it keeps the experts whose norm is within 2*jitter_eps of the max.
        weight_TK, idx_TK = sparsemixer(scores_TE.float(), jitter_eps=jitter_eps, training=False, top_k=k)
        return weight_TK, idx_TK

    return rule


def aoe_rule(normalization: str) -> GateRule:
    from aoe.layers.routing import select_top_k

    def rule(scores_TE: Tensor, k: int) -> tuple[Tensor, Tensor]:
        selection = select_top_k(scores_TE, k, normalization)
        # select_top_k returns token-major assignments, K per token
        return selection.weight.view(-1, k), selection.expert_idx.view(-1, k)

    return rule


# ----- adapters per architecture -------------------------------------------------------------


def _fused_experts(experts: nn.Module) -> ExpertWeights:
    """Split transformers' fused ``gate_up_proj`` (E, 2I, D) into W_g and W_p (gate first)."""
    width = experts.gate_up_proj.shape[1] // 2
    return ExpertWeights(experts.gate_up_proj[:, :width], experts.gate_up_proj[:, width:],
                         experts.down_proj, experts.act_fn)


def _hf_adapter(block: nn.Module, top_k: int | None) -> BlockAdapter:
    name = type(block).__name__
    if name == "PhimoeSparseMoeBlock":
        router = block.router
        return BlockAdapter(_fused_experts(block.experts), lambda x: F.linear(x, router.weight),
                            phimoe_rule(router.router_jitter_noise), top_k or router.top_k)
    gate = block.gate
    logits = lambda x: F.linear(x, gate.weight)  # noqa: E731
    if name == "MixtralSparseMoeBlock":
        return BlockAdapter(_fused_experts(block.experts), logits, softmax_top_k_rule(True), top_k or gate.top_k)
    rule = softmax_top_k_rule(bool(gate.norm_topk_prob))
    shared = None
    if name == "Qwen2MoeSparseMoeBlock":
        def shared(x: Tensor) -> Tensor:
            return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    return BlockAdapter(_fused_experts(block.experts), logits, rule, top_k or gate.top_k, shared)


def _aoe_moe_adapter(block: nn.Module, top_k: int | None) -> BlockAdapter:
    bank = block.experts
    if block.config.selection != "top_k":
        raise NotImplementedError(f"router-free selection needs top-K token choice, not selection={block.config.selection!r}")
    if bank.factorized:
        # shape: (E, D, I) the factorised control's W_g = W_down W_up, rebuilt per expert
        w_gate = torch.einsum("del,elh->edh", bank.w_gate_down, bank.w_gate_up)
    else:
        w_gate = bank.w_gate
    weights = ExpertWeights(w_gate.transpose(1, 2), bank.w_proj.transpose(1, 2), bank.w_out.transpose(1, 2), F.silu)
    return BlockAdapter(weights, lambda x: block.scores(x)[0], aoe_rule(block.config.gate_normalization),
                        top_k or block.config.top_k)


HF_BLOCKS = ("MixtralSparseMoeBlock", "PhimoeSparseMoeBlock", "OlmoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock",
             "Qwen3MoeSparseMoeBlock")


def find_moe_blocks(model: nn.Module) -> list[nn.Module]:
    """Return the sparse MoE blocks of a supported transformers model or of an aoe MoE Transformer."""
    from aoe.layers.moe import MoE

    blocks = [m for m in model.modules() if type(m).__name__ in HF_BLOCKS or isinstance(m, MoE)]
    if not blocks:
        raise ValueError(f"no sparse MoE block found in {type(model).__name__}: supported are {', '.join(HF_BLOCKS)} "
                         "and aoe MoE layers (ffn.kind='moe')")
    return blocks


def block_adapter(block: nn.Module, top_k: int | None = None) -> BlockAdapter:
    if type(block).__name__ in HF_BLOCKS:
        return _hf_adapter(block, top_k)
    return _aoe_moe_adapter(block, top_k)


# ----- the router-free forward ---------------------------------------------------------------


def node_activations(x_TD: Tensor, weights: ExpertWeights, node: str) -> Tensor:
    """Every expert's activation at ``node`` for every token; returns (E, T, W)."""
    # shape: (E, T, I) — one batched matmul per projection, all experts at once
    if node == "proj":
        return torch.matmul(x_TD, weights.proj.transpose(1, 2))
    gate_ETI = torch.matmul(x_TD, weights.gate.transpose(1, 2))
    if node == "gate":
        return gate_ETI
    silu_ETI = weights.act(gate_ETI)
    if node == "silu_gate":
        return silu_ETI
    hidden_ETI = silu_ETI * torch.matmul(x_TD, weights.proj.transpose(1, 2))
    if node == "hidden":
        return hidden_ETI
    if node == "output":
        # shape: (E, T, D)
        return torch.matmul(hidden_ETI, weights.out.transpose(1, 2))
    raise ValueError(f"invalid node {node!r}: expected one of {NODES}")


def finish_expert(x_nD: Tensor, cached_nW: Tensor | None, weights: ExpertWeights, expert: int, node: str | None) -> Tensor:
    """Continue one expert's forward pass from its cached ``node`` activation; returns (n, D).

    ``node=None`` (the router and random settings) runs the whole expert.
    """
    if node == "output":
        return cached_nW
    if node == "hidden":
        hidden_nI = cached_nW
    else:
        if node == "gate":
            act_nI = weights.act(cached_nW)
        elif node == "silu_gate":
            act_nI = cached_nW
        else:
            act_nI = weights.act(x_nD @ weights.gate[expert].t())
        proj_nI = cached_nW if node == "proj" else x_nD @ weights.proj[expert].t()
        hidden_nI = act_nI * proj_nI
    return hidden_nI @ weights.out[expert].t()


def routed_output(x_TD: Tensor, adapter: BlockAdapter, weight_TK: Tensor, idx_TK: Tensor,
                  cache_ETW: Tensor | None, node: str | None) -> Tensor:
    """Run the selected experts (from the cache where there is one) and sum their weighted outputs."""
    out_TD = torch.zeros_like(x_TD)
    for expert in range(adapter.experts.gate.shape[0]):
        # shape: (n,) both — the tokens that chose this expert, and at which of their K slots
        token, slot = (idx_TK == expert).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        cached = None if cache_ETW is None else cache_ETW[expert, token]
        rows_nD = finish_expert(x_TD[token], cached, adapter.experts, expert, node)
        out_TD.index_add_(0, token, (rows_nD * weight_TK[token, slot, None].to(rows_nD.dtype)).to(out_TD.dtype))
    return out_TD


def routerless_block_output(x_TD: Tensor, adapter: BlockAdapter, node: str, norm: str,
                            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The block's output with ``node``/``norm`` selection; returns (out (T, D), weights (T, K), experts (T, K))."""
    cache_ETW = None
    # 1. node and 2. score. shape: (T, E) fp32
    if node == "router":
        scores_TE = adapter.router_logits(x_TD)
    elif node == "random":
        scores_TE = torch.rand(x_TD.shape[0], adapter.experts.gate.shape[0], generator=generator).to(x_TD.device)
    else:
        # shape: (E, T, W)
        cache_ETW = node_activations(x_TD, adapter.experts, node)
        scores_TE = torch.linalg.vector_norm(cache_ETW.float(), ord=NORM_ORDERS[norm], dim=-1).t()

    # 3. select and weigh, with the model's own rule. shape: (T, K) both
    weight_TK, idx_TK = adapter.gate_rule(scores_TE, adapter.top_k)

    # 4. finish and 5. combine. shape: (T, D)
    out_TD = routed_output(x_TD, adapter, weight_TK, idx_TK, cache_ETW, None if cache_ETW is None else node)
    if adapter.shared_expert is not None:
        out_TD = out_TD + adapter.shared_expert(x_TD)
    return out_TD, weight_TK, idx_TK


def _patched_forward(block: nn.Module, adapter: BlockAdapter, node: str, norm: str, generator: torch.Generator):
    is_aoe = type(block).__name__ not in HF_BLOCKS

    def forward(self, hidden_states: Tensor, valid_mask: Tensor | None = None):
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        out_TD, weight_TK, idx_TK = routerless_block_output(x_TD, adapter, node, norm, generator)
        out = out_TD.view(shape)
        if not is_aoe:
            return out
        return out, _aoe_routing_output(x_TD, weight_TK, idx_TK, adapter, valid_mask)

    return types.MethodType(forward, block)


def _aoe_routing_output(x_TD: Tensor, weight_TK: Tensor, idx_TK: Tensor, adapter: BlockAdapter, valid_mask: Tensor | None):
    """Build the aoe ``RoutingOutput`` of a patched block: no auxiliary loss, and statistics of the new choice."""
    from aoe.layers.moe import RoutingOutput
    from aoe.layers.routing import Selection, routing_stats

    num_tokens, k = idx_TK.shape
    num_experts = adapter.experts.gate.shape[0]
    mask_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=x_TD.device).scatter_(1, idx_TK, True)
    token_idx = torch.arange(num_tokens, device=x_TD.device).repeat_interleave(k)
    selection = Selection(token_idx, idx_TK.reshape(-1), weight_TK.reshape(-1).float(), mask_TE)
    # The statistics use the weights as scores, because the norms are not kept past selection.
    scores_TE = torch.zeros(num_tokens, num_experts, device=x_TD.device).scatter_(1, idx_TK, weight_TK.float())
    valid_T = None if valid_mask is None else valid_mask.reshape(-1).bool()
    zero = x_TD.new_zeros((), dtype=torch.float32)
    return RoutingOutput(zero, zero, routing_stats(scores_TE, selection, valid_T))


@contextlib.contextmanager
def routerless(model: nn.Module, node: str, norm: str = "l2", top_k: int | None = None,
               seed: int = 0) -> Iterator[nn.Module]:
    """Within the block, every sparse MoE block of ``model`` selects its experts by ``node``/``norm``.

    ``node`` is one of NODES or REFERENCE_NODES; ``top_k`` overrides each block's K. The weights
    are not modified, and the original forwards are restored on exit.
    """
    if node not in NODES + REFERENCE_NODES:
        raise ValueError(f"invalid node {node!r}: expected one of {', '.join(NODES + REFERENCE_NODES)}")
    if norm not in NORMS:
        raise ValueError(f"invalid norm {norm!r}: expected one of {', '.join(NORMS)}")
    blocks = find_moe_blocks(model)
    generator = torch.Generator().manual_seed(seed)
    for block in blocks:
        adapter = block_adapter(block, top_k)
        num_experts = adapter.experts.gate.shape[0]
        if not 1 <= adapter.top_k <= num_experts:
            raise ValueError(f"invalid top_k={adapter.top_k}: expected 1 to the number of experts ({num_experts})")
        # An instance attribute shadows the class's forward; deleting it restores the original.
        block.forward = _patched_forward(block, adapter, node, norm, generator)
    try:
        yield model
    finally:
        for block in blocks:
            del block.forward
