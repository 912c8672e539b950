"""A Llama-style decoder whose FFN is dense, a router MoE, or an AoE layer.

Shape legend:
    B  batch     S  sequence     D  d_model     V  vocabulary
    H  heads     G  key/value heads              Dh head dimension

Each block is pre-RMSNorm: x + attn(norm(x)), then x + ffn(norm(x)). Attention is causal
``scaled_dot_product_attention`` with rotary position embeddings on queries and keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from aoe.layers.experts import scaled_out_std
from aoe.layers.moe import RoutingOutput, SparseFFN, build_ffn
from aoe.model.config import ModelConfig

Tensor = torch.Tensor
IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: Tensor | None  # shape: (B, S, V) fp32
    loss: Tensor | None = None  # mean cross-entropy over valid targets, plus aux_loss
    ce_sum: Tensor | None = None  # summed cross-entropy over valid targets
    num_valid: Tensor | None = None  # valid targets
    aux_loss: Tensor | None = None  # sum over layers of the auxiliary losses
    routing: list[RoutingOutput | None] = field(default_factory=list)


def rotary_tables(head_dim: int, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """Cos and sin tables for rotary embeddings at ``positions`` (..., S); returns (..., S, Dh/2) each."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, S, Dh) by position, with the two halves of Dh as the pair (Llama's convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    # shape: (B or 1, 1, S, Dh/2) broadcast over heads
    cos, sin = cos[:, None], sin[:, None]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, out_init_std: float):
        super().__init__()
        self.n_heads = config.attention.n_heads
        self.n_kv_heads = config.attention.kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, std=config.init_std)
        nn.init.normal_(self.wo.weight, std=out_init_std)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None) -> Tensor:
        batch, seq, _ = x.shape
        # shape: (B, H, S, Dh) and (B, G, S, Dh)
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        # shape: (B, S, D)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        out_std = scaled_out_std(config.init_std, config.n_layers)
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config, out_std)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = build_ffn(config.ffn, config.d_model, config.init_std, out_std)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None,
                valid_mask: Tensor | None) -> tuple[Tensor, RoutingOutput | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, SparseFFN):
            out, routing = self.ffn(h, valid_mask)
        else:
            out, routing = self.ffn(h), None
        return x + out, routing


class Transformer(nn.Module):
    """Decoder-only language model. ``forward`` returns logits, the loss and per-layer routing output."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=config.init_std)

    def num_params(self) -> int:
        """Parameters of the built module; tied tensors count once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> ModelOutput:
        """Run the decoder.

        input_ids: (B, S). labels: (B, S) next-token targets aligned with input_ids, with
        -100 where no loss is taken. attention_mask: (B, S), 1 for real tokens and 0 for
        padding; padding tokens are left out of routing losses and statistics. position_ids
        default to 0..S-1, or to the running count of real tokens when a mask is given.
        """
        batch, seq = input_ids.shape
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={self.config.max_seq_len}")

        attn_mask = None
        valid_mask = None
        if attention_mask is not None:
            valid_mask = attention_mask.bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            if not bool(valid_mask.all()):
                # shape: (B, 1, S, S) causal and key-padding mask; a padded query row keeps its
                # own key so that softmax never sees an all-masked row.
                causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
                attn_mask = (causal[None] & valid_mask[:, None, :]) | torch.eye(seq, dtype=torch.bool, device=input_ids.device)
                attn_mask = attn_mask[:, None]
        elif labels is not None:
            valid_mask = labels != IGNORE_INDEX
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device)[None]
        elif position_ids.dim() == 1:
            # A (S,) tensor applies to every row. Without the batch axis, the rotary tables
            # would broadcast S against the head axis and rotate by the wrong positions.
            position_ids = position_ids[None]
        if position_ids.shape[-1] != seq or position_ids.dim() != 2:
            raise ValueError(f"invalid position_ids shape {tuple(position_ids.shape)}: expected ({seq},), "
                             f"(1, {seq}) or ({batch}, {seq}) to match input_ids")
        cos, sin = rotary_tables(self.config.head_dim, position_ids, self.config.attention.rope_theta)

        # shape: (B, S, D)
        x = self.embed(input_ids)
        routing: list[RoutingOutput | None] = []
        for block in self.layers:
            x, layer_routing = block(x, cos, sin, attn_mask, valid_mask)
            routing.append(layer_routing)
        x = self.norm(x)

        # shape: (B, S, V); the loss is taken in fp32 for a stable log-softmax
        logits = self.lm_head(x).float()
        aux_terms = [r.aux_loss for r in routing if r is not None]
        aux_loss = torch.stack(aux_terms).sum() if aux_terms else logits.new_zeros(())

        if labels is None:
            return ModelOutput(logits=logits, aux_loss=aux_loss, routing=routing)
        ce_sum = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
        num_valid = (labels != IGNORE_INDEX).sum()
        # A batch without valid targets gives loss 0 rather than 0/0.
        loss = ce_sum / num_valid.clamp_min(1) + aux_loss
        return ModelOutput(logits, loss, ce_sum, num_valid, aux_loss, routing)
