"""Training steps to benchmark: one MoE or AoE layer, transformers' Mixtral block, a whole model.

Every step is forward + backward of a scalar loss on fixed random inputs. FLOPs come from the
config's own counter (``FFNConfig.forward_flops_per_token``, x3 for forward + backward), so
utilisation counts the matmul work of the selected experts, the router or AoE's scoring, and
nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aoe.bench.measure import Case, synchronized
from aoe.layers.moe import build_ffn
from aoe.model.config import FFNConfig, ModelConfig

Tensor = torch.Tensor


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer's shape; ``d_low`` None is the router MoE, a number is AoE at matched parameters."""

    d_model: int
    d_ffn: int
    n_experts: int
    top_k: int
    tokens: int
    d_low: int | None = None

    @property
    def kind(self) -> str:
        return "moe" if self.d_low is None else "aoe"

    def ffn_config(self) -> FFNConfig:
        return FFNConfig(kind=self.kind, d_ffn=self.d_ffn, n_experts=self.n_experts, top_k=self.top_k, d_low=self.d_low)

    def train_flops(self) -> float:
        return 3.0 * self.tokens * self.ffn_config().forward_flops_per_token(self.d_model)

    def label(self) -> str:
        return "MoE" if self.d_low is None else f"AoE d_low {self.d_low}"


def build_layer(shape: LayerShape, dtype: torch.dtype, implementation: str = "grouped", seed: int = 0,
                device: torch.device | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = build_ffn(shape.ffn_config(), shape.d_model).to(device or "cpu", dtype)
    layer.experts.implementation = implementation
    return layer.train()


def layer_inputs(shape: LayerShape, dtype: torch.dtype, seed: int = 1,
                 device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Input activations (T, D) and a fixed upstream gradient direction (T, D)."""
    device = device or torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.tokens, shape.d_model, generator=gen).to(device, dtype)
    direction = torch.randn(shape.tokens, shape.d_model, generator=gen).to(device)
    return x.requires_grad_(), direction


def layer_case(name: str, layer: torch.nn.Module, x: Tensor, direction: Tensor, flops: float) -> Case:
    """Forward + backward of ``layer``; the loss is <out, direction> plus the layer's auxiliary loss."""

    def step() -> None:
        out = layer(x)
        if isinstance(out, tuple):
            out, routing = out
            loss = (out.float() * direction).sum() + routing.aux_loss
        else:
            loss = (out.float() * direction).sum()
        loss.backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return Case(name, synchronized(step, x.device), flops=flops, tokens=x.numel() // x.shape[-1])


# ----- transformers' Mixtral block on the same weights --------------------------------------


def mixtral_implementations() -> list[str]:
    """Experts implementations of the installed transformers ("eager" plus its registry)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]


def mixtral_block_from(moe: torch.nn.Module, implementation: str) -> torch.nn.Module:
    """Build a ``MixtralSparseMoeBlock`` holding the same router and expert weights as our ``MoE``.

    Mixtral's router takes softmax over all experts, keeps the top K and renormalises, which
    equals our ``softmax_top_k`` gate weights. Its expert weights are stored transposed, with
    W_g and W_p concatenated: gate_up_proj (E, 2H, D), down_proj (E, D, H).
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    experts = moe.experts
    config = MixtralConfig(hidden_size=experts.d_model, intermediate_size=experts.hidden,
                           num_local_experts=experts.num_experts, num_experts_per_tok=moe.config.top_k,
                           router_jitter_noise=0.0, experts_implementation=implementation)
    block = MixtralSparseMoeBlock(config).to(experts.w_proj.device, experts.w_proj.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([experts.w_gate, experts.w_proj], dim=2).transpose(1, 2))
        block.experts.down_proj.copy_(experts.w_out.transpose(1, 2))
    return block.train()


def batched_mm_bytes(shape: LayerShape, dtype: torch.dtype) -> int:
    """Bytes of the per-assignment weight copies that transformers' "batched_mm" gathers (forward only)."""
    rows = shape.tokens * shape.top_k
    return rows * 3 * shape.d_ffn * shape.d_model * torch.empty((), dtype=dtype).element_size()


# ----- whole model -------------------------------------------------------------------------


def model_case(name: str, config: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype,
               seed: int = 0, device: torch.device | None = None) -> tuple[Case, torch.nn.Module]:
    """Build the case of one full training step of the decoder: forward, backward and an AdamW update."""
    from aoe.model.decoder import Transformer

    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    model = Transformer(config).to(device, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    input_ids, labels = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        loss = model(input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = float(config.train_flops_per_token(seq_len)) * batch * seq_len
    return Case(name, synchronized(step, device), flops=flops, tokens=batch * seq_len), model
