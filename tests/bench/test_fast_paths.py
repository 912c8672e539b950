"""ExpertBank's grouped paths against its per-expert loop, inside whole MoE and AoE layers.

"grouped" is the default path (``_CPUGroupedMM`` here), "torch_grouped_mm" is the path CUDA
takes, run on torch's CPU kernel. Both must reproduce the loop's outputs and every gradient:
to fp32 rounding in fp32 (each expert's block is one mm either way, but gradients sum in
another order), and within bf16 rounding in bf16.
"""

from __future__ import annotations

import pytest
import torch

from aoe.layers import experts as experts_module
from aoe.layers.moe import build_ffn
from aoe.model.config import FFNConfig

FAST_PATHS = ["grouped", "torch_grouped_mm"]
# (kind, d_low): d_model 32 keeps every width a multiple of 16 bytes for the MoE, so the torch
# kernel really runs; AoE's matched d_wide (45 at d_low 8) is odd and takes the CPU fallback.
# ("moe", 8) is the router MoE with a factorised W_g, which computes x W_down per expert block.
VARIANTS = [("moe", None), ("aoe", 8), ("aoe", 16), ("moe", 8)]


def layer_and_input(kind: str, d_low: int | None, dtype: torch.dtype, implementation: str):
    torch.manual_seed(0)
    config = FFNConfig(kind=kind, d_ffn=32, n_experts=4, top_k=2, d_low=d_low, aux_loss_coef=0.1)
    layer = build_ffn(config, 32, init_std=0.2).to(dtype)
    layer.experts.implementation = implementation
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 32, generator=gen).to(dtype).requires_grad_()
    direction = torch.randn(2, 12, 32, generator=gen)
    return layer, x, direction


def outputs_and_grads(kind, d_low, dtype, implementation):
    layer, x, direction = layer_and_input(kind, d_low, dtype, implementation)
    out, routing = layer(x)
    ((out.float() * direction).sum() + routing.aux_loss).backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    grads["input"] = x.grad
    return out.detach(), grads


@pytest.mark.parametrize("kind,d_low", VARIANTS)
@pytest.mark.parametrize("implementation", FAST_PATHS)
def test_fast_path_equals_loop_fp32(kind, d_low, implementation):
    ref_out, ref_grads = outputs_and_grads(kind, d_low, torch.float32, "loop")
    out, grads = outputs_and_grads(kind, d_low, torch.float32, implementation)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind,d_low", VARIANTS)
def test_grouped_equals_loop_bf16(kind, d_low):
    ref_out, ref_grads = outputs_and_grads(kind, d_low, torch.bfloat16, "loop")
    out, grads = outputs_and_grads(kind, d_low, torch.bfloat16, "grouped")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-3)
    for name, grad in grads.items():
        assert grad.dtype == ref_grads[name].dtype, name
        torch.testing.assert_close(grad.float(), ref_grads[name].float(), rtol=2e-2, atol=2e-3, msg=name)


def test_grouped_under_autocast_equals_loop():
    results = []
    for implementation in ("loop", "grouped"):
        layer, x, direction = layer_and_input("aoe", 16, torch.float32, implementation)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, routing = layer(x)
        (out.float() * direction).sum().backward()
        results.append((out.float(), layer.experts.w_out.grad))
    assert results[1][0].dtype == torch.float32
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=2e-2, atol=2e-3)


def test_torch_kernel_runs_on_cpu(monkeypatch):
    """The CUDA code path calls torch._grouped_mm; check that it really runs here at aligned widths."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    calls = []
    original = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    outputs_and_grads("moe", None, torch.float32, "torch_grouped_mm")
    assert len(calls) == 3  # W_g, W_p and W_o, one grouped GEMM each


def test_grouped_mm_skips_empty_experts():
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(3, 8, 16, requires_grad=True)
    counts = torch.tensor([2, 0, 3])
    out = experts_module.grouped_mm(x, w, torch.cumsum(counts, 0, dtype=torch.int32))
    expected = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert torch.count_nonzero(w.grad[1]) == 0
    torch.testing.assert_close(w.grad[0], x[:2].t() @ torch.ones(2, 16))


def test_invalid_implementation_rejected():
    layer, x, _ = layer_and_input("moe", None, torch.float32, "fused")
    with pytest.raises(ValueError, match="implementation"):
        layer(x)
