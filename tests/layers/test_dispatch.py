"""The fast dispatch path of MoE and AoE against a per-token loop written from the definitions.

The reference scores every expert for one token at a time, ranks the scores with Python's
``sorted`` (ties to the lower index), weights the chosen experts, runs each with plain matmuls
and sums. The layers must match it on outputs, the auxiliary loss and every gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aoe.layers import experts as experts_module
from aoe.layers.experts import DenseSwiGLU
from aoe.layers.moe import AoE, MoE, build_ffn
from aoe.model.config import FFNConfig

D_MODEL = 16
D_FFN = 24
N_EXPERTS = 4
N_TOKENS = 20
AUX_COEF = 0.5

# (kind, d_low): a router MoE, AoE, and the router MoE whose W_g is factorised like AoE's.
VARIANTS = [("moe", None), ("aoe", 6), ("moe", 6)]
VARIANT_IDS = ["moe", "aoe", "moe_factorised"]
# Every expert-compute path that ExpertBank offers must match the reference.
IMPLEMENTATIONS = getattr(experts_module, "EXPERT_IMPLEMENTATIONS", ("loop",))


def make_layer(kind: str, d_low: int | None, top_k: int, seed: int = 0, n_experts: int = N_EXPERTS,
               implementation: str | None = None):
    torch.manual_seed(seed)
    config = FFNConfig(kind=kind, d_ffn=D_FFN, n_experts=n_experts, top_k=top_k, d_low=d_low,
                       aux_loss_coef=AUX_COEF)
    # A larger init than the model default keeps outputs and gradients far from zero, so
    # relative tolerances mean something.
    layer = build_ffn(config, D_MODEL, init_std=0.3)
    if implementation is not None and hasattr(layer.experts, "implementation"):
        layer.experts.implementation = implementation
    return layer


def reference_forward(layer, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (output (T, D), coefficient-weighted load-balancing loss) computed token by token."""
    bank = layer.experts
    num_experts, top_k = layer.config.n_experts, layer.config.top_k
    is_aoe = isinstance(layer, AoE)

    outputs, probs, counts = [], [], [0] * num_experts
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        if is_aoe:
            low = [x @ bank.w_gate_down[:, e] for e in range(num_experts)]
            scores = torch.stack([torch.sqrt((c * c).sum()) for c in low])
        else:
            scores = layer.router.weight @ x
        chosen = sorted(range(num_experts), key=lambda e: (-scores[e].item(), e))[:top_k]
        for e in chosen:
            counts[e] += 1
        probs.append(torch.softmax(scores, dim=0))
        if top_k > 1:
            weights = torch.softmax(scores[chosen], dim=0)
        else:
            # Top-1 weights by softmax over all scores, so the scores keep a gradient.
            weights = probs[-1][chosen]

        out = torch.zeros_like(x)
        for weight, e in zip(weights, chosen):
            if is_aoe:
                gate = low[e] @ bank.w_gate_up[e]
            elif bank.factorized:
                gate = (x @ bank.w_gate_down[:, e]) @ bank.w_gate_up[e]
            else:
                gate = x @ bank.w_gate[e]
            hidden = F.silu(gate) * (x @ bank.w_proj[e])
            out = out + weight * (hidden @ bank.w_out[e])
        outputs.append(out)

    # L_aux = E * sum_i f_i * P_i with f_i = tokens sent to i / T.
    num_tokens = x_TD.shape[0]
    fraction = torch.tensor(counts, dtype=torch.float32) / num_tokens
    mean_prob = torch.stack(probs).mean(dim=0)
    aux = AUX_COEF * num_experts * (fraction * mean_prob).sum()
    return torch.stack(outputs), aux


def gradients(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().float() - expected.detach()).norm() / expected.detach().norm().clamp_min(1e-12))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("kind,d_low", VARIANTS, ids=VARIANT_IDS)
def test_dispatch_matches_loop_fp32(kind, d_low, top_k, implementation):
    layer = make_layer(kind, d_low, top_k, implementation=implementation)
    torch.manual_seed(1)
    x = torch.randn(4, N_TOKENS // 4, D_MODEL, requires_grad=True)
    probe = torch.randn(4, N_TOKENS // 4, D_MODEL)
    names, params = zip(*layer.named_parameters())
    tensors = [x, *params]

    out, routing = layer(x)
    loss = (out * probe).sum() + routing.aux_loss
    grads = gradients(loss, tensors)

    ref_out, ref_aux = reference_forward(layer, x.reshape(-1, D_MODEL))
    ref_loss = (ref_out.view_as(probe) * probe).sum() + ref_aux
    ref_grads = gradients(ref_loss, tensors)

    torch.testing.assert_close(out.reshape(-1, D_MODEL), ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.aux_loss, ref_aux, rtol=1e-6, atol=1e-7)
    for name, grad, ref_grad in zip(("input", *names), grads, ref_grads):
        assert ref_grad.norm() > 0, f"reference gradient of {name} is zero, so the check is vacuous"
        # Summation order differs between the paths, so the absolute slack scales with the
        # gradient's largest entry.
        atol = 1e-5 * float(ref_grad.abs().max())
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind,d_low", VARIANTS, ids=VARIANT_IDS)
def test_dispatch_matches_loop_bf16_autocast(kind, d_low, implementation):
    layer = make_layer(kind, d_low, top_k=2, implementation=implementation)
    torch.manual_seed(2)
    x = torch.randn(N_TOKENS, D_MODEL, requires_grad=True)
    probe = torch.randn(N_TOKENS, D_MODEL)
    names, params = zip(*layer.named_parameters())
    tensors = [x, *params]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, routing = layer(x)
        loss = (out.float() * probe).sum() + routing.aux_loss
    grads = gradients(loss, tensors)

    ref_out, ref_aux = reference_forward(layer, x)
    ref_grads = gradients((ref_out * probe).sum() + ref_aux, tensors)

    # Selection runs on fp32 scores, so it matches exactly, and so does the auxiliary loss.
    assert routing.aux_loss.dtype == torch.float32
    torch.testing.assert_close(routing.aux_loss, ref_aux, rtol=1e-6, atol=1e-7)
    # bf16 keeps 8 significant bits (relative step 2**-8 = 0.4%), so a few chained matmuls
    # stay within a few percent.
    assert relative_error(out, ref_out) < 2e-2
    for name, grad, ref_grad in zip(("input", *names), grads, ref_grads):
        assert grad.dtype == torch.float32, name
        assert relative_error(grad, ref_grad) < 3e-2, name


def test_single_expert_moe_equals_dense_swiglu():
    layer = make_layer("moe", None, top_k=1, n_experts=1)
    dense = DenseSwiGLU(D_MODEL, D_FFN)
    bank = layer.experts
    with torch.no_grad():
        dense.w_gate.weight.copy_(bank.w_gate[0].t())
        dense.w_proj.weight.copy_(bank.w_proj[0].t())
        dense.w_out.weight.copy_(bank.w_out[0].t())

    torch.manual_seed(3)
    x = torch.randn(2, 5, D_MODEL, requires_grad=True)
    probe = torch.randn(2, 5, D_MODEL)
    out, routing = layer(x)
    grad_x, grad_gate, grad_out = torch.autograd.grad((out * probe).sum(), [x, bank.w_gate, bank.w_out])
    dense_out = dense(x)
    dense_grads = torch.autograd.grad((dense_out * probe).sum(), [x, dense.w_gate.weight, dense.w_out.weight])

    torch.testing.assert_close(out, dense_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, dense_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_gate[0], dense_grads[1].t(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_out[0], dense_grads[2].t(), rtol=1e-5, atol=1e-6)
    # One expert takes every token with probability 1: L_aux = E * f * P = 1.
    assert float(routing.load_balancing_loss) == pytest.approx(1.0, abs=1e-6)


def route_to_first_two_experts(layer) -> torch.Tensor:
    """Set the scores so that experts 0 and 1 win every token, and return such inputs."""
    torch.manual_seed(4)
    x = torch.randn(N_TOKENS, D_MODEL)
    with torch.no_grad():
        if isinstance(layer, MoE):
            # Logits 10*x0 and 5*x0 for experts 0 and 1, zero for the rest, with x0 >= 1.
            x[:, 0] = x[:, 0].abs() + 1.0
            layer.router.weight.zero_()
            layer.router.weight[0, 0] = 10.0
            layer.router.weight[1, 0] = 5.0
        else:
            # Norms of experts 2 and 3 shrink 1000x, so they never rank in the top 2.
            layer.experts.w_gate_down[:, 2:] *= 1e-3
    return x.requires_grad_(True)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind,d_low", VARIANTS[:2], ids=VARIANT_IDS[:2])
def test_experts_without_tokens(kind, d_low, implementation):
    layer = make_layer(kind, d_low, top_k=2, implementation=implementation)
    x = route_to_first_two_experts(layer)
    probe = torch.randn(N_TOKENS, D_MODEL)

    out, routing = layer(x)
    (out * probe).sum().add(routing.aux_loss).backward()
    ref_out, _ = reference_forward(layer, x)

    assert routing.stats.tokens_per_expert.tolist() == [N_TOKENS, N_TOKENS, 0, 0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name, param in layer.experts.named_parameters():
        assert param.grad is not None, f"{name} has no gradient tensor"
        idle = param.grad[:, 2:] if name == "w_gate_down" else param.grad[2:]
        busy = param.grad[:, :2] if name == "w_gate_down" else param.grad[:2]
        if name == "w_gate_down":
            # AoE scores every expert, so the idle experts' W_down still gets a gradient
            # through the softmax in the load-balancing loss.
            assert idle.abs().sum() > 0, name
        else:
            assert idle.abs().sum() == 0, f"{name}: experts without tokens got a gradient"
        assert busy.abs().sum() > 0, name
