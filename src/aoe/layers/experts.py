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

Expert compute has three implementations with the same outputs and gradients:
    "grouped"           one grouped GEMM per projection over all experts, the default:
                        ``torch._grouped_mm`` on CUDA (bf16), ``_CPUGroupedMM`` on CPU
    "torch_grouped_mm"  ``torch._grouped_mm`` on any device; torch 2.13 has a CPU kernel too,
                        which lets tests check the CUDA code path on CPU
    "loop"              a Python loop over experts, one matmul per projection: the reference path
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from aoe.layers.routing import Selection

Tensor = torch.Tensor

EXPERT_IMPLEMENTATIONS = ("grouped", "torch_grouped_mm", "loop")


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

    # One of EXPERT_IMPLEMENTATIONS; all give the same outputs and gradients. A class
    # attribute, so that subclasses that skip __init__ have it too.
    implementation: str = "grouped"

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
        if x_ND.shape[0] == 0:
            return x_ND.new_zeros(0, self.d_model)
        if self.implementation not in EXPERT_IMPLEMENTATIONS:
            raise ValueError(f"invalid ExpertBank.implementation={self.implementation!r}: "
                             f"expected one of {EXPERT_IMPLEMENTATIONS}")
        if self.implementation == "torch_grouped_mm":
            return self.forward_grouped(x_ND, counts, gate_low_NL, use_torch_kernel=True)
        if self.implementation == "grouped" and grouped_mm_supported(x_ND, self.d_model, self.hidden, self.d_low):
            return self.forward_grouped(x_ND, counts, gate_low_NL)
        return self.forward_loop(x_ND, counts, gate_low_NL)

    def forward_loop(self, x_ND: Tensor, counts: Tensor, gate_low_NL: Tensor | None = None) -> Tensor:
        """Run the reference path: one ``expert_forward`` per expert that has rows."""
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

    def forward_grouped(self, x_ND: Tensor, counts: Tensor, gate_low_NL: Tensor | None = None,
                        use_torch_kernel: bool | None = None) -> Tensor:
        """Run all experts at once, each projection as one grouped GEMM over the expert blocks.

        Autograd writes each weight's gradient once into a stacked (E, ., .) tensor, where the
        loop's per-expert indexing builds and sums one full-size gradient per expert.
        """
        # shape: (E,) int32 end row of each expert's block, the layout grouped_mm expects
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        # Grouped GEMMs are not autocast-aware, so the cast autocast would apply to a matmul is done here.
        dtype = _matmul_dtype(x_ND)
        x_ND = x_ND.to(dtype)

        if self.factorized:
            if gate_low_NL is None:
                # shape: (N, L); W_down as (E, D, L), one expert's block of columns per group
                gate_low_NL = grouped_mm(x_ND, self.w_gate_down.transpose(0, 1).to(dtype), offsets, use_torch_kernel)
            # shape: (N, H)
            gate_NH = grouped_mm(gate_low_NL.to(dtype), self.w_gate_up.to(dtype), offsets, use_torch_kernel)
        else:
            gate_NH = grouped_mm(x_ND, self.w_gate.to(dtype), offsets, use_torch_kernel)
        # shape: (N, H)
        hidden_NH = F.silu(gate_NH) * grouped_mm(x_ND, self.w_proj.to(dtype), offsets, use_torch_kernel)
        # shape: (N, D)
        return grouped_mm(hidden_NH, self.w_out.to(dtype), offsets, use_torch_kernel)


def _matmul_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def grouped_mm_supported(x: Tensor, *widths: int | None) -> bool:
    """Return whether ``grouped_mm`` runs for this device and dtype. The widths matter on CUDA only."""
    dtype = _matmul_dtype(x)
    if x.device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda" and hasattr(torch, "_grouped_mm"):
        # NOTE: the CUDA kernel wants bf16, SM80 or newer, and rows whose byte length is a
        # multiple of 16 (8 bf16 values). Untested here: no GPU was available when this was written.
        aligned = all(w is None or w % 8 == 0 for w in widths)
        return dtype == torch.bfloat16 and aligned and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def grouped_mm(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor, use_torch_kernel: bool | None = None) -> Tensor:
    """Multiply each expert's block of rows by that expert's matrix: (N, I) x (E, I, O) -> (N, O).

    ``offsets_E`` holds the end row of each expert's block. ``use_torch_kernel`` picks
    ``torch._grouped_mm`` with its own autograd (the default on CUDA) or ``_CPUGroupedMM`` (the
    default on CPU, and the fallback for operands whose row strides the CPU kernel rejects).
    """
    if use_torch_kernel is None:
        use_torch_kernel = x_NI.device.type == "cuda"
    x_NI = x_NI.contiguous()
    if use_torch_kernel and (x_NI.device.type == "cuda" or _strides_fit_torch_kernel(x_NI, w_EIO)):
        if not (w_EIO.is_contiguous() or w_EIO.transpose(-2, -1).is_contiguous()):
            # W_down viewed as (E, D, L) interleaves experts in memory; the kernel wants each
            # expert's matrix in one block, row- or column-major.
            w_EIO = w_EIO.contiguous()
        return torch._grouped_mm(x_NI, w_EIO, offs=offsets_E)
    return _CPUGroupedMM.apply(x_NI, w_EIO, offsets_E)


def _strides_fit_torch_kernel(x_NI: Tensor, w_EIO: Tensor) -> bool:
    """Return whether the CPU ``torch._grouped_mm`` accepts these operands (16-byte aligned rows, in and out)."""
    size = x_NI.element_size()
    strides = [*x_NI.stride(), *w_EIO.stride(), w_EIO.shape[-1]]
    return all(stride == 1 or stride * size % 16 == 0 for stride in strides) and \
        all(t.data_ptr() % 16 == 0 for t in (x_NI, w_EIO))


def _cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # On a CPU without bf16 matrix units (no AVX512-BF16 or AMX), torch's bf16 GEMM runs about
    # 100x slower than its fp32 GEMM. There bf16 operands are multiplied in fp32 and the product
    # is rounded to bf16, as the bf16 kernel itself rounds its fp32 accumulator.
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    return dtype


def _grouped_kernel(a_NI: Tensor, b_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    """(N, I) x (E, I, O) -> (N, O) without autograd, one mm per expert into one output buffer.

    On CPU ``torch._grouped_mm`` (torch 2.13) returns bit-identical results, and rejects row
    strides that are not a multiple of 16 bytes, such as AoE's matched d_wide of 4393.
    """
    out = a_NI.new_empty(a_NI.shape[0], b_EIO.shape[-1])
    start = 0
    for expert, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(a_NI[start:end], b_EIO[expert], out=out[start:end])
        start = end
    return out


def _grouped_weight_grad(a_NI: Tensor, g_NO: Tensor, offsets_E: Tensor, num_experts: int) -> Tensor:
    """Per expert, a_block^T @ g_block: (N, I), (N, O) -> (E, I, O); experts without rows get zeros."""
    grad = a_NI.new_zeros(num_experts, a_NI.shape[1], g_NO.shape[1])
    start = 0
    for expert, end in enumerate(offsets_E.tolist()):
        if end > start:
            torch.mm(a_NI[start:end].t(), g_NO[start:end], out=grad[expert])
        start = end
    return grad


class _CPUGroupedMM(torch.autograd.Function):
    """Grouped GEMM on CPU; bf16 operands are multiplied in fp32 where the CPU has no bf16 units.

    Saves its operands in their own dtype, never fp32 copies of bf16 tensors.
    """

    @staticmethod
    def forward(ctx, x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_NI, w_EIO, offsets_E)
        compute = _cpu_compute_dtype(x_NI.dtype)
        out = _grouped_kernel(x_NI.to(compute), w_EIO.to(compute), offsets_E)
        return out.to(x_NI.dtype)

    @staticmethod
    def backward(ctx, grad_NO: Tensor):
        x_NI, w_EIO, offsets_E = ctx.saved_tensors
        compute = _cpu_compute_dtype(x_NI.dtype)
        grad_NO = grad_NO.to(compute).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # shape: (N, I)
            grad_x = _grouped_kernel(grad_NO, w_EIO.to(compute).transpose(-2, -1), offsets_E).to(x_NI.dtype)
        if ctx.needs_input_grad[1]:
            # shape: (E, I, O)
            grad_w = _grouped_weight_grad(x_NI.to(compute), grad_NO, offsets_E, w_EIO.shape[0]).to(w_EIO.dtype)
        return grad_x, grad_w, None


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
