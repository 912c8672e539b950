"""An expert-parallel MoE/AoE layer on two processes against the same layer in one process.

Each rank feeds half of the tokens. Concatenated over the ranks, the outputs and input
gradients must equal the single-process layer's; each rank's expert shard must hold its slice
of the single-process weight gradient, and the replicated weights' gradients must sum to it.
The loss per rank is sum(out * g) + aux / W, whose sum over the ranks is the single-process
loss sum(out * g) + aux, because the ranks' aux losses average to the global one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from aoe.layers.expert_parallel import EXPERT_DIM, ExpertParallelBank, shard_experts
from aoe.layers.moe import build_ffn
from aoe.model.config import FFNConfig
from dist_harness import run_ranks, single_thread  # noqa: F401 (autouse fixture)

WORLD = 2
D_MODEL = 16
N_EXPERTS = 4
N_TOKENS = 24  # global; each rank takes 12

# (kind, d_low): router MoE, AoE, and the MoE whose W_g is factorised (W_down sharded there).
VARIANTS = [("moe", None), ("aoe", 8), ("moe", 8)]
VARIANT_IDS = ["moe", "aoe", "moe_factorised"]


def make_layer(kind: str, d_low: int | None, scenario: str):
    torch.manual_seed(0)
    # d_low 8 and d_wide 28 keep every expert matrix row 16-byte aligned for grouped GEMMs.
    config = FFNConfig(kind=kind, d_ffn=24, n_experts=N_EXPERTS, top_k=2, d_low=d_low,
                       d_wide=28 if d_low is not None else None, aux_loss_coef=0.5)
    layer = build_ffn(config, D_MODEL, init_std=0.3)
    direction = torch.nn.functional.normalize(torch.ones(D_MODEL), dim=0)
    with torch.no_grad():
        if scenario == "idle_rank" and kind == "aoe":
            # Experts 2 and 3 get tiny activation norms, so no token selects them and the rank
            # that owns them receives no rows at all.
            layer.experts.w_gate_down[:, 2:] *= 0.01
        elif scenario in ("idle_rank", "local_only") and kind == "moe":
            # Router logits along one direction: tokens near +direction pick experts 0 and 1;
            # for "local_only", tokens near -direction pick 2 and 3.
            layer.router.weight.zero_()
            layer.router.weight[0] = 2.0 * direction
            layer.router.weight[1] = 1.5 * direction
            layer.router.weight[2] = -2.0 * direction
    return layer


def make_inputs(scenario: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    # shape: (T, D) each
    x = torch.randn(N_TOKENS, D_MODEL, generator=generator)
    grad = torch.randn(N_TOKENS, D_MODEL, generator=generator)
    direction = torch.nn.functional.normalize(torch.ones(D_MODEL), dim=0)
    if scenario == "idle_rank":
        x = 0.3 * x + 4.0 * direction
    elif scenario == "local_only":
        half = N_TOKENS // 2
        x = 0.3 * x + 4.0 * direction
        x[half:] = 0.3 * x[half:] - 8.0 * direction
    return x, grad


def autocast(scenario: str):
    enabled = scenario == "bf16"
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=enabled)


def ep_layer_worker(rank: int, world: int, kind: str, d_low: int | None, scenario: str) -> dict:
    layer = make_layer(kind, d_low, scenario)
    layer.balance_group = dist.group.WORLD
    shard_experts(layer)
    assert isinstance(layer.experts, ExpertParallelBank)

    x_full, grad_full = make_inputs(scenario)
    rows = slice(rank * N_TOKENS // world, (rank + 1) * N_TOKENS // world)
    x = x_full[rows].clone().requires_grad_()
    with autocast(scenario):
        out, routing = layer(x)
    loss = (out.float() * grad_full[rows]).sum() + routing.aux_loss / world
    loss.backward()

    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in layer.named_parameters()}
    return {"out": out.detach(), "x_grad": x.grad, "aux": routing.aux_loss.detach(),
            "tokens_per_expert": routing.stats.tokens_per_expert, "grads": grads,
            "sharded": layer.experts.sharded_dims()}


def single_process(kind: str, d_low: int | None, scenario: str) -> dict:
    layer = make_layer(kind, d_low, scenario)
    x_full, grad_full = make_inputs(scenario)
    x = x_full.clone().requires_grad_()
    with autocast(scenario):
        out, routing = layer(x)
    ((out.float() * grad_full).sum() + routing.aux_loss).backward()
    return {"out": out.detach(), "x_grad": x.grad, "aux": routing.aux_loss.detach(),
            "tokens_per_expert": routing.stats.tokens_per_expert,
            "grads": {name: p.grad for name, p in layer.named_parameters()}}


def check_against_single(ranks: list[dict], single: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), single["out"], rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), single["x_grad"], rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.stack([r["aux"] for r in ranks]).mean(), single["aux"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sum(r["tokens_per_expert"] for r in ranks), single["tokens_per_expert"])

    sharded = ranks[0]["sharded"]
    for name, expected in single["grads"].items():
        param_name = name.rsplit(".", 1)[-1]
        if name.startswith("experts.") and param_name in sharded:
            blocks = [r["grads"][name] for r in ranks]
            torch.testing.assert_close(torch.cat(blocks, dim=EXPERT_DIM[param_name]), expected, rtol=rtol, atol=atol,
                                       msg=lambda m, n=name: f"sharded gradient {n}: {m}")
        else:
            total = sum(r["grads"][name] for r in ranks)
            torch.testing.assert_close(total, expected, rtol=rtol, atol=atol,
                                       msg=lambda m, n=name: f"replicated gradient {n}: {m}")


@pytest.mark.parametrize(("kind", "d_low"), VARIANTS, ids=VARIANT_IDS)
def test_expert_parallel_layer_matches_single(kind, d_low):
    ranks = run_ranks(ep_layer_worker, WORLD, kind, d_low, "random")
    single = single_process(kind, d_low, "random")
    # Every expert receives rows in this scenario.
    assert all(int(single["tokens_per_expert"][e]) > 0 for e in range(N_EXPERTS))
    check_against_single(ranks, single)
    if kind == "aoe":
        assert "w_gate_down" not in ranks[0]["sharded"], "AoE must keep W_down replicated"
    if d_low is not None and kind == "moe":
        assert ranks[0]["sharded"]["w_gate_down"] == 1


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_idle_rank_keeps_gradients(kind):
    d_low = 8 if kind == "aoe" else None
    ranks = run_ranks(ep_layer_worker, WORLD, kind, d_low, "idle_rank")
    single = single_process(kind, d_low, "idle_rank")
    # Experts 2 and 3 (rank 1's) receive nothing; 0 and 1 receive rows from both ranks.
    assert single["tokens_per_expert"].tolist() == [N_TOKENS, N_TOKENS, 0, 0]
    check_against_single(ranks, single)
    assert float(ranks[0]["grads"]["experts.w_proj"].abs().sum()) > 0


def test_tokens_staying_on_their_rank():
    ranks = run_ranks(ep_layer_worker, WORLD, "moe", None, "local_only")
    single = single_process("moe", None, "local_only")
    # Rank 0's tokens pick experts 0 and 1, rank 1's pick 2 and 3: no row crosses ranks.
    assert ranks[0]["tokens_per_expert"].tolist() == [12, 12, 0, 0]
    assert ranks[1]["tokens_per_expert"].tolist() == [0, 0, 12, 12]
    check_against_single(ranks, single)


def test_bf16_autocast_matches_single():
    ranks = run_ranks(ep_layer_worker, WORLD, "aoe", 8, "bf16")
    single = single_process("aoe", 8, "bf16")
    assert ranks[0]["out"].dtype == torch.bfloat16
    # Both sides round the same bf16 products; only the order of the gradient sums differs.
    check_against_single(ranks, single, rtol=2e-2, atol=2e-3)


def ep_step_worker(rank: int, world: int) -> dict:
    from aoe.train.distributed import DistributedContext, Parallelism

    layer = make_layer("moe", None, "idle_rank")
    layer.balance_group = dist.group.WORLD
    shard_experts(layer)
    parallel = Parallelism(layer, layer, "ep", DistributedContext(rank, world, rank, "gloo", torch.device("cpu")))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)

    x_full, grad_full = make_inputs("idle_rank")
    rows = slice(rank * N_TOKENS // world, (rank + 1) * N_TOKENS // world)
    out, routing = layer(x_full[rows])
    ((out * grad_full[rows]).sum() + routing.aux_loss / world).backward()
    parallel.finish_gradients()
    had_grads = {name: p.grad is not None for name, p in layer.named_parameters()}
    optimizer.step()
    return {"params": {name: p.detach().clone() for name, p in layer.named_parameters()}, "had_grads": had_grads}


def test_idle_experts_still_take_optimizer_step():
    ranks = run_ranks(ep_step_worker, WORLD)
    # Rank 1's experts received no rows but still get zero gradients, so AdamW decays them
    # exactly as it decays the unused slices of the single-process bank.
    assert all(ranks[1]["had_grads"].values())

    layer = make_layer("moe", None, "idle_rank")
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    x_full, grad_full = make_inputs("idle_rank")
    out, routing = layer(x_full)
    # Data-parallel training differentiates the mean of the ranks' losses.
    (((out * grad_full).sum() + routing.aux_loss) / WORLD).backward()
    optimizer.step()

    for name, expected in layer.named_parameters():
        param_name = name.rsplit(".", 1)[-1]
        if name.startswith("experts."):
            got = torch.cat([r["params"][name] for r in ranks], dim=EXPERT_DIM[param_name])
        else:
            got = ranks[0]["params"][name]
        torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
