"""The router MoE layer and the Autonomy-of-Experts (AoE) layer.

Shape legend:
    B  batch           S  sequence         T  tokens = B*S
    D  d_model         E  experts          L  low rank d_low
    N  (token, expert) assignments

Both layers follow the same pipeline: score -> select -> dispatch -> experts -> combine, and
return their auxiliary losses and routing statistics next to the output, never in hidden state.

- ``MoE`` scores with a router (a linear map, or the two-map "large router" control).
- ``AoE`` has no router. Every expert computes its low-rank gate activation C_i = x W_down^i
  (one matmul for all experts); the norm of C_i is the expert's score; the selected experts
  finish their forward pass from the cached C_i, and the others stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from aoe.layers.experts import ExpertBank, combine, plan_dispatch
from aoe.layers.routing import (
    RoutingStats,
    Selection,
    activation_norms,
    load_balancing_loss,
    routing_stats,
    select_expert_choice,
    select_top_k,
    select_top_p,
    selection_entropy,
)
from aoe.model.config import FFNConfig

Tensor = torch.Tensor


@dataclass(frozen=True)
class RoutingOutput:
    """The auxiliary losses and routing statistics a sparse layer returns beside its output."""

    aux_loss: Tensor  # shape: () coefficient-weighted sum of this layer's auxiliary losses
    load_balancing_loss: Tensor  # shape: () L_aux / alpha, detached, for logging
    stats: RoutingStats


class SparseFFN(nn.Module):
    """Selection, dispatch, combine and auxiliary losses shared by ``MoE`` and ``AoE``."""

    def __init__(self, config: FFNConfig, d_model: int, init_std: float = 0.02, out_init_std: float | None = None):
        super().__init__()
        self.config = config
        self.d_model = d_model
        self.num_experts = config.n_experts
        self.experts = ExpertBank(config.n_experts, d_model, config.expert_width(d_model),
                                  d_low=config.d_low, init_std=init_std, out_init_std=out_init_std)
        # Process group over which the load-balancing loss takes f_i and P_i while training;
        # None keeps it local. Set by aoe.train.distributed for data and expert parallelism.
        self.balance_group = None

    def select(self, scores_TE: Tensor, valid_T: Tensor | None) -> Selection:
        cfg = self.config
        if cfg.selection == "top_k":
            return select_top_k(scores_TE, cfg.top_k, cfg.gate_normalization)
        if cfg.selection == "top_p":
            return select_top_p(scores_TE, cfg.top_p)
        return select_expert_choice(scores_TE, cfg.capacity_factor, valid_T)

    def auxiliary_losses(self, scores_TE: Tensor, selection: Selection, valid_T: Tensor | None) -> tuple[Tensor, Tensor]:
        cfg = self.config
        aux = scores_TE.new_zeros((), dtype=torch.float32)
        group = self.balance_group if self.training else None
        balance = load_balancing_loss(scores_TE, selection.mask_TE, valid_T, group)
        # Expert choice balances load by construction and takes no auxiliary loss.
        if cfg.selection != "expert_choice" and cfg.aux_loss_coef > 0:
            aux = aux + cfg.aux_loss_coef * balance
        if cfg.selection == "top_p" and cfg.entropy_loss_coef > 0:
            aux = aux + cfg.entropy_loss_coef * selection_entropy(scores_TE, valid_T)
        return aux, balance.detach()

    def scores(self, x_TD: Tensor) -> tuple[Tensor, Tensor | None]:
        """Return fp32 scores (T, E) and, for AoE, the low-rank cache (T, E, L)."""
        raise NotImplementedError

    def forward(self, x: Tensor, valid_mask: Tensor | None = None) -> tuple[Tensor, RoutingOutput]:
        """Route ``x`` (..., D); ``valid_mask`` (...) marks the tokens that count in losses and stats."""
        shape = x.shape
        # shape: (T, D)
        x_TD = x.reshape(-1, self.d_model)
        valid_T = None if valid_mask is None else valid_mask.reshape(-1).bool()

        # 1. score. shape: (T, E) fp32; AoE also returns its cache, shape (T, E, L)
        scores_TE, cache_TEL = self.scores(x_TD)

        # 2. select. shapes: (N,) assignments
        selection = self.select(scores_TE, valid_T)

        # 3. dispatch. shape: (N, D) rows grouped by expert
        plan = plan_dispatch(selection, self.num_experts)
        x_ND = x_TD[plan.token_idx]
        # shape: (N, L) AoE reuses the cached activation of each selected (token, expert)
        low_NL = None if cache_TEL is None else cache_TEL[plan.token_idx, plan.expert_idx]

        # 4. experts. shape: (N, D)
        rows_ND = self.experts(x_ND, plan.counts, low_NL)

        # 5. combine. shape: (T, D)
        out_TD = combine(rows_ND, plan, x_TD.shape[0])

        aux, balance = self.auxiliary_losses(scores_TE, selection, valid_T)
        stats = routing_stats(scores_TE.detach(), selection, valid_T)
        return out_TD.view(shape), RoutingOutput(aux, balance, stats)


class LargeRouter(nn.Module):
    """Two linear maps without a nonlinearity, D -> H -> E: the paper's "large router" control."""

    def __init__(self, d_model: int, hidden: int, num_experts: int, init_std: float):
        super().__init__()
        self.down = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(hidden, num_experts, bias=False)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.normal_(self.up.weight, std=init_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class MoE(SparseFFN):
    """Router MoE: logits = router(x), then top-K (or another selection), weighted experts."""

    def __init__(self, config: FFNConfig, d_model: int, init_std: float = 0.02, out_init_std: float | None = None):
        if config.kind != "moe":
            raise ValueError(f"invalid ffn.kind={config.kind!r} for MoE: expected 'moe'")
        super().__init__(config, d_model, init_std, out_init_std)
        if config.router == "large":
            self.router = LargeRouter(d_model, config.router_hidden_width(d_model), config.n_experts, init_std)
        else:
            self.router = nn.Linear(d_model, config.n_experts, bias=False)
            nn.init.normal_(self.router.weight, std=init_std)

    def scores(self, x_TD: Tensor) -> tuple[Tensor, None]:
        # Router logits in fp32 even under autocast: bf16 logits flip near-tied top-K choices.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            params = [p.float() for p in self.router.parameters()]
            if isinstance(self.router, LargeRouter):
                logits_TE = x_TD.float() @ params[0].t() @ params[1].t()
            else:
                logits_TE = x_TD.float() @ params[0].t()
        return logits_TE, None


class AoE(SparseFFN):
    """Autonomy-of-Experts: experts select themselves by the norm of their low-rank gate activation."""

    def __init__(self, config: FFNConfig, d_model: int, init_std: float = 0.02, out_init_std: float | None = None):
        if config.kind != "aoe":
            raise ValueError(f"invalid ffn.kind={config.kind!r} for AoE: expected 'aoe'")
        super().__init__(config, d_model, init_std, out_init_std)

    def scores(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        # The cache is computed in fp32 so that the norms, and hence the selection, match an
        # fp32 run exactly. The selected rows are cast back to the compute dtype afterwards.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            # shape: (T, E, L)
            cache_TEL = x_TD.float() @ self.experts.w_gate_down.float().reshape(self.d_model, -1)
            cache_TEL = cache_TEL.view(-1, self.num_experts, self.config.d_low)
            # shape: (T, E)
            norms_TE = activation_norms(cache_TEL, self.config.score_norm)
        return norms_TE, cache_TEL


def build_ffn(config: FFNConfig, d_model: int, init_std: float = 0.02, out_init_std: float | None = None) -> nn.Module:
    """Build the FFN block a config describes: ``DenseSwiGLU``, ``MoE`` or ``AoE``."""
    from aoe.layers.experts import DenseSwiGLU

    if config.kind == "moe":
        return MoE(config, d_model, init_std, out_init_std)
    if config.kind == "aoe":
        return AoE(config, d_model, init_std, out_init_std)
    return DenseSwiGLU(d_model, config.d_ffn, init_std, out_init_std)
