"""SwiGLU experts stored as stacked tensors, and dropless dispatch to them.

Shape legend:
    T  tokens          D  d_model           E  experts
    N  (token, expert) assignments          H  expert hidden width (d_ffn, or d_wide)
    L  low rank d_low of a factorised gate projection

Paper symbols -> parameters of ``ExpertBank``:
    W_g  -> w_gate       (E, D, H)    ordinary gate projection
    W_down -> w_gate_down (D, E, L)   factorised gate, first step; stored so that one matmul
                                      x @ w_gate_down.view(D, E*L) scores all experts at once
    W_up -> w_gate_up    (E, L, H)    factorised gate, second step
    W_p  -> w_proj       (E, D, H)
    W_o  -> w_out        (E, H, D)

Pipeline: ``plan_dispatch`` orders the assignments by expert, ``ExpertBank.forward`` runs each
expert on its contiguous block of rows, and ``combine`` scales the rows by their gate weights
and sums them back per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from aoe.layers.routing import Selection

Tensor = torch.Tensor


@dataclass(frozen=True)
class DispatchPlan:
    """Assignments sorted by expert, so that each expert's rows form one contiguous block."""

    token_idx: Tensor  # shape: (N,) token of each row
    expert_idx: Tensor  # shape: (N,) expert of each row, non-decreasing
    weight: Tensor  # shape: (N,) fp32 gate weight of each row
    counts: Tensor  # shape: (E,) rows per expert


def plan_dispatch(selection: Selection, num_experts: int) -> DispatchPlan:
    # shape: (N,) a stable sort keeps token order inside each expert's block
    order = torch.sort(selection.expert_idx, stable=True).indices
    expert_idx = selection.expert_idx[order]
    return DispatchPlan(
        token_idx=selection.token_idx[order],
        expert_idx=expert_idx,
        weight=selection.weight[order],
        counts=torch.bincount(expert_idx, minlength=num_experts),
    )


def combine(rows_ND: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """Sum each token's expert outputs weighted by their gates; unassigned tokens get zeros."""
    # shape: (N, D)
    weighted_ND = rows_ND * plan.weight.to(rows_ND.dtype)[:, None]
    # shape: (T, D)
    out_TD = rows_ND.new_zeros(num_tokens, rows_ND.shape[-1])
    return out_TD.index_add(0, plan.token_idx, weighted_ND)


class ExpertBank(nn.Module):
    """E SwiGLU experts, E_i(x) = (SiLU(gate_i(x)) * x W_p^i) W_o^i, with an optional factorised gate."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, d_low: int | None = None,
                 init_std: float = 0.02, out_init_std: float | None = None):
        super().__init__()
        self.num_experts, self.d_model, self.hidden, self.d_low = num_experts, d_model, hidden, d_low
        self.init_std = init_std
        self.out_init_std = out_init_std if out_init_std is not None else init_std
        if d_low is None:
            self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        else:
            self.w_gate_down = nn.Parameter(torch.empty(d_model, num_experts, d_low))
            self.w_gate_up = nn.Parameter(torch.empty(num_experts, d_low, hidden))
        self.w_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.reset_parameters()

    @property
    def factorized(self) -> bool:
        return self.d_low is not None

    def reset_parameters(self) -> None:
        for name, param in self.named_parameters(recurse=False):
            std = self.out_init_std if name == "w_out" else self.init_std
            nn.init.normal_(param, mean=0.0, std=std)

    def low_rank(self, x_TD: Tensor) -> Tensor:
        """x W_down for every expert in one matmul; returns the cache C with shape (T, E, L)."""
        assert self.factorized, "low_rank needs a factorised gate"
        # shape: (T, E*L) -> (T, E, L)
        return (x_TD @ self.w_gate_down.reshape(self.d_model, -1)).view(-1, self.num_experts, self.d_low)

    def expert_forward(self, expert: int, x_nD: Tensor, gate_low_nL: Tensor | None = None) -> Tensor:
        """Run one expert on its block of rows; ``gate_low_nL`` reuses a cached x W_down."""
        if self.factorized:
            if gate_low_nL is None:
                gate_low_nL = x_nD @ self.w_gate_down[:, expert]
            gate_nH = gate_low_nL.to(x_nD.dtype) @ self.w_gate_up[expert]
        else:
            gate_nH = x_nD @ self.w_gate[expert]
        # shape: (n, H)
        hidden_nH = F.silu(gate_nH) * (x_nD @ self.w_proj[expert])
        # shape: (n, D)
        return hidden_nH @ self.w_out[expert]

    def forward(self, x_ND: Tensor, counts: Tensor, gate_low_NL: Tensor | None = None) -> Tensor:
        """Run every expert on its contiguous block of the expert-sorted rows ``x_ND``."""
        # NOTE: the block sizes must be known on the host to slice; on CPU this costs nothing.
        sizes = counts.tolist()
        x_blocks = torch.split(x_ND, sizes)
        low_blocks = torch.split(gate_low_NL, sizes) if gate_low_NL is not None else [None] * len(sizes)
        outputs = []
        for expert, (x_nD, low_nL) in enumerate(zip(x_blocks, low_blocks)):
            if x_nD.shape[0] == 0:
                continue
            outputs.append(self.expert_forward(expert, x_nD, low_nL))
        if not outputs:
            return x_ND.new_zeros(0, self.d_model)
        # NOTE: experts without rows do no compute. Because the weights are stacked tensors,
        # those experts' slices still get a .grad (of zeros) whenever any expert ran.
        return torch.cat(outputs, dim=0)


class DenseSwiGLU(nn.Module):
    """The dense Llama FFN: (SiLU(x W_g) * x W_p) W_o."""

    def __init__(self, d_model: int, hidden: int, init_std: float = 0.02, out_init_std: float | None = None):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_proj = nn.Linear(d_model, hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.w_gate.weight, std=init_std)
        nn.init.normal_(self.w_proj.weight, std=init_std)
        nn.init.normal_(self.w_out.weight, std=out_init_std if out_init_std is not None else init_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(F.silu(self.w_gate(x)) * self.w_proj(x))


def scaled_out_std(init_std: float, n_layers: int) -> float:
    """Output-projection init std scaled by 1/sqrt(2 * n_layers), as in GPT-2, so the residual stream does not grow with depth."""
    return init_std / math.sqrt(2 * n_layers)
