"""Expert parallelism: each rank stores a contiguous block of experts, and tokens travel to them.

Shape legend:
    N  (token, expert) rows this rank sends, sorted by global expert
    R  rows this rank receives for its own experts
    W  ranks in the expert-parallel group
    E  experts in the layer          El experts per rank, E / W
    D  d_model                       L  low rank d_low

Design:
- Rank r owns experts [r*El, (r+1)*El). Their W_g (or W_up), W_p and W_o are sharded along the
  expert axis; everything else in the model, the router included, is replicated.
- AoE's W_down stays replicated on every rank: each token's rank scores ALL experts, selects
  them, and sends only the selected rows together with their cached low-rank activations
  x W_down^i. The receiving rank never recomputes x W_down. Because W_down and the router are
  replicated, their gradients are all-reduced like any data-parallel weight (see
  ``aoe.train.distributed``). For a router MoE with a factorised gate, W_down is an ordinary
  expert weight and is sharded along its expert axis (dim 1).
- ``ExpertParallelBank`` replaces an ``ExpertBank`` and keeps its forward contract: rows sorted
  by global expert plus counts per expert in, rows in the same order out. ``MoE`` and ``AoE``
  run unchanged around it, so parameter names stay the same as in a single-process model.

Pipeline of ``ExpertParallelBank.forward``: exchange counts -> dispatch (all-to-all) ->
regroup by local expert -> local experts -> restore arrival order -> combine (all-to-all back).

Gradients: the all-to-all is differentiable (its backward is the reverse all-to-all), so an
expert shard's gradient is the derivative of the SUM of every rank's loss. Data-parallel
averaging divides it by W afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from aoe.layers.experts import ExpertBank

Tensor = torch.Tensor

# Expert axis of each ExpertBank parameter.
EXPERT_DIM = {"w_gate": 0, "w_gate_up": 0, "w_proj": 0, "w_out": 0, "w_gate_down": 1}


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, input_ND: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        # shape: (sum(output_splits), D)
        output = input_ND.new_empty(sum(output_splits), *input_ND.shape[1:])
        dist.all_to_all_single(output, input_ND.contiguous(), output_splits, input_splits, group=group)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        # shape: (sum(input_splits), D)
        grad_input = grad_output.new_empty(sum(ctx.input_splits), *grad_output.shape[1:])
        dist.all_to_all_single(grad_input, grad_output.contiguous(), ctx.input_splits, ctx.output_splits,
                               group=ctx.group)
        return grad_input, None, None, None


def all_to_all(input_ND: Tensor, output_splits: list[int], input_splits: list[int], group=None) -> Tensor:
    """Send ``input_splits[r]`` rows to rank r and receive ``output_splits[r]`` rows from it; differentiable."""
    return _AllToAll.apply(input_ND, output_splits, input_splits, group)


@dataclass(frozen=True)
class ExpertExchange:
    """The row movement between ranks of one forward pass; the return trip reuses it reversed."""

    input_splits: list[int]  # rows sent to each rank
    output_splits: list[int]  # rows received from each rank
    local_order: Tensor  # shape: (R,) arrival position of each row once grouped by local expert
    local_counts: Tensor  # shape: (El,) rows per local expert


def plan_exchange(counts_E: Tensor, num_ranks: int, group=None) -> ExpertExchange:
    """Exchange per-expert row counts, from which every rank derives the split sizes of the all-to-all.

    ``counts_E`` holds how many of this rank's rows go to each global expert. Every rank of the
    group must call this, also with all counts zero, because it is a collective.
    """
    num_local = counts_E.numel() // num_ranks
    # shape: (W, El) rows this rank sends to each expert, grouped by the rank that owns it
    send_WE = counts_E.reshape(num_ranks, num_local).contiguous()
    # shape: (W, El) rows each source rank sends to each of this rank's experts
    recv_WE = torch.empty_like(send_WE)
    dist.all_to_all_single(recv_WE, send_WE, group=group)

    # shape: (R,) local expert of each received row, in arrival order (source-major)
    local_expert_R = torch.repeat_interleave(
        torch.arange(num_local, device=counts_E.device).repeat(num_ranks), recv_WE.reshape(-1))
    # A stable sort keeps the rows of one expert in source-rank order, which is the order a
    # single process that concatenates the ranks' batches would give them.
    local_order = torch.sort(local_expert_R, stable=True).indices
    return ExpertExchange(
        input_splits=send_WE.sum(dim=1).tolist(),
        output_splits=recv_WE.sum(dim=1).tolist(),
        local_order=local_order,
        local_counts=recv_WE.sum(dim=0),
    )


class ExpertParallelBank(ExpertBank):
    """The local block of an ``ExpertBank``'s experts; ``forward`` exchanges rows with the other ranks.

    ``num_experts`` stays the global count, so callers see the same interface as the unsharded
    bank. ``replicate_gate_down`` keeps W_down whole (AoE scores every expert on the token's
    rank); otherwise W_down is sharded like the other expert weights.
    """

    def __init__(self, bank: ExpertBank, group=None, replicate_gate_down: bool = False):
        nn.Module.__init__(self)
        num_ranks = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if bank.num_experts % num_ranks != 0:
            raise ValueError(f"invalid ffn.n_experts={bank.num_experts} for expert parallelism over {num_ranks} "
                             f"ranks: n_experts must be a multiple of the world size")
        self.num_experts, self.d_model, self.hidden, self.d_low = bank.num_experts, bank.d_model, bank.hidden, bank.d_low
        self.init_std, self.out_init_std = bank.init_std, bank.out_init_std
        self.group, self.num_ranks = group, num_ranks
        self.num_local_experts = bank.num_experts // num_ranks
        self.first_expert = rank * self.num_local_experts
        self.replicate_gate_down = replicate_gate_down and bank.factorized

        self._sharded_dims = {name: EXPERT_DIM[name] for name, _ in bank.named_parameters(recurse=False)
                              if not (name == "w_gate_down" and self.replicate_gate_down)}
        for name, param in bank.named_parameters(recurse=False):
            if name in self._sharded_dims:
                param = param.narrow(self._sharded_dims[name], self.first_expert, self.num_local_experts)
            setattr(self, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))

    def sharded_dims(self) -> dict[str, int]:
        """Expert axis of every parameter this rank holds only a block of."""
        return dict(self._sharded_dims)

    def forward(self, x_ND: Tensor, counts: Tensor, gate_low_NL: Tensor | None = None) -> Tensor:
        """Run the experts of rows sorted by global expert wherever they live; returns rows in input order."""
        if self.replicate_gate_down and gate_low_NL is None:
            raise ValueError("an expert-parallel bank with a replicated W_down needs the cached x W_down of each row")

        # 1. exchange counts, which give every rank the sizes it sends and receives
        exchange = plan_exchange(counts, self.num_ranks, self.group)

        # 2. dispatch. shape: (N, D) or (N, D + L). The cached low-rank activations travel in
        # the compute dtype, because the expert would cast them to it anyway.
        payload_ND = x_ND if gate_low_NL is None else torch.cat([x_ND, gate_low_NL.to(x_ND.dtype)], dim=-1)
        received_RD = all_to_all(payload_ND, exchange.output_splits, exchange.input_splits, self.group)

        # 3. regroup by local expert. shape: (R, D) and (R, L)
        grouped_RD = received_RD[exchange.local_order]
        x_local_RD = grouped_RD[:, :self.d_model]
        low_local_RL = grouped_RD[:, self.d_model:] if gate_low_NL is not None else None

        # 4. local experts. shape: (R, D)
        rows_RD = super().forward(x_local_RD, exchange.local_counts, low_local_RL)
        if rows_RD.grad_fn is None and torch.is_grad_enabled():
            # NOTE: with no rows here, the output would depend neither on the received rows nor
            # on the weights. Autograd would then skip this rank's backward all-to-alls, and the
            # other ranks would wait forever. The zero term also gives the weights the zero
            # gradient that a single process gives experts without tokens.
            anchors = [p.sum() for p in self.parameters() if p.requires_grad]
            if received_RD.requires_grad:
                anchors.append(received_RD.sum())
            if anchors:
                rows_RD = rows_RD + 0.0 * sum(anchor.float() for anchor in anchors).to(rows_RD.dtype)

        # 5. restore arrival order and send every row back to the rank of its token. shape: (N, D)
        arrival_RD = torch.empty_like(rows_RD).index_copy(0, exchange.local_order, rows_RD)
        return all_to_all(arrival_RD, exchange.input_splits, exchange.output_splits, self.group)


def shard_experts(model: nn.Module, group=None) -> list[str]:
    """Replace the ``ExpertBank`` of every MoE and AoE layer in ``model`` by this rank's block of experts.

    Every rank must hold the same weights when this is called. Returns the qualified names of
    the parameters that are now sharded, for gradient synchronisation and checkpoints.
    """
    from aoe.layers.moe import AoE, SparseFFN

    sharded: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, SparseFFN) or isinstance(module.experts, ExpertParallelBank):
            continue
        module.experts = ExpertParallelBank(module.experts, group, replicate_gate_down=isinstance(module, AoE))
        prefix = f"{name}.experts." if name else "experts."
        sharded.extend(prefix + param_name for param_name in module.experts.sharded_dims())
    return sharded


def sharded_expert_params(model: nn.Module) -> dict[str, tuple[nn.Parameter, int, ExpertParallelBank]]:
    """Map each sharded parameter's qualified name to (parameter, expert axis, its bank)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelBank):
            for param_name, dim in module.sharded_dims().items():
                found[f"{name}.{param_name}" if name else param_name] = (getattr(module, param_name), dim, module)
    return found
