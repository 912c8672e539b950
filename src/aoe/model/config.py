"""Model configs: one dataclass per concern, each validated on construction and able to count
its own parameters and FLOPs.

Counting conventions (the ones the AoE paper uses for its 732M/247M and 4B/1.18B models):
- total parameters count every stored tensor once, so tied input/output embeddings count once;
- active parameters count what one token's forward pass multiplies with: attention, the K
  selected experts, the router, the norms, and the embedding table *and* the output head
  separately (twice when they are tied), because both are used for every token;
- for AoE, "active" counts the K selected experts in full, like the paper. The low-rank
  W_down of the n-K experts that stop is reported separately as ``scoring_params`` and is
  included in the FLOP counts.

FLOPs are multiply-adds times two. Training FLOPs per token are three times the forward FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from aoe.config_utils import ConfigError, check, check_choice

FFN_KINDS = ("dense", "moe", "aoe")
SELECTIONS = ("top_k", "top_p", "expert_choice")
GATE_NORMALIZATIONS = ("softmax_top_k", "top_k_softmax_all")
SCORE_NORMS = ("l2", "l1", "linf")
ROUTER_KINDS = ("linear", "large")
WIDE_ROUNDING = ("nearest", "floor", "ceil")


def matched_d_wide(d_model: int, d_ffn: int, d_low: int, rounding: str = "nearest", multiple: int = 1) -> int:
    """Return the AoE hidden width whose expert has as many parameters as a SwiGLU expert of width d_ffn.

    Solves d_model*d_low + d_low*d_wide + 2*d_model*d_wide = 3*d_model*d_ffn for d_wide and
    rounds the result: to the nearest integer (the default; ties round up), down, or up, and
    then to the nearest multiple of ``multiple`` (for kernels that want aligned widths).
    """
    exact = (3 * d_model * d_ffn - d_low * d_model) / (d_low + 2 * d_model)
    if rounding == "nearest":
        width = math.floor(exact + 0.5)
    elif rounding == "floor":
        width = math.floor(exact)
    elif rounding == "ceil":
        width = math.ceil(exact)
    else:
        raise ConfigError(f"invalid rounding={rounding!r}: expected one of {WIDE_ROUNDING}")
    if multiple > 1:
        width = max(multiple, int(math.floor(width / multiple + 0.5)) * multiple)
    if width <= 0:
        raise ConfigError(f"invalid d_low={d_low}: the matched d_wide would be {exact:.2f}, which is not positive")
    return width


def large_router_hidden(d_model: int, n_experts: int, d_low: int) -> int:
    """Return the hidden width H of a two-map router (D->H->E) with about n*d_low*d_model parameters."""
    return max(1, round(n_experts * d_low * d_model / (d_model + n_experts)))


@dataclass
class FFNConfig:
    """The feed-forward block of every layer: a dense SwiGLU, a router MoE, or an AoE layer.

    For ``moe`` and ``aoe``, ``d_ffn`` is the width of one MoE expert. AoE experts (and the
    MoE factorised-gate control, ``moe`` with ``d_low`` set) use the width ``d_wide`` that
    matches that expert's parameter count, unless ``d_wide`` is given.
    """

    kind: str = "dense"
    d_ffn: int = 3072
    n_experts: int = 8
    top_k: int = 2
    # Rank of the factorised gate projection W_g = W_down W_up. Required for AoE; for MoE it
    # turns on the factorised-W_g control.
    d_low: int | None = None
    d_wide: int | None = None
    d_wide_rounding: str = "nearest"
    d_wide_multiple: int = 1
    # Selection strategy and its knobs.
    selection: str = "top_k"
    top_p: float = 0.6
    capacity_factor: float = 2.0
    # softmax_top_k: softmax over the K selected scores (the paper's form).
    # top_k_softmax_all: softmax over all n scores, keep the top K, no renormalisation.
    gate_normalization: str = "softmax_top_k"
    score_norm: str = "l2"
    router: str = "linear"
    # Hidden width of the ``large`` router; None derives it from router_match_d_low.
    router_hidden: int | None = None
    router_match_d_low: int = 128
    aux_loss_coef: float = 0.01
    entropy_loss_coef: float = 1e-4

    def __post_init__(self) -> None:
        check_choice("ffn.kind", self.kind, FFN_KINDS)
        check(isinstance(self.d_ffn, int) and self.d_ffn > 0, "ffn.d_ffn", self.d_ffn, "expected a positive integer")
        check_choice("ffn.selection", self.selection, SELECTIONS)
        check_choice("ffn.gate_normalization", self.gate_normalization, GATE_NORMALIZATIONS)
        check_choice("ffn.score_norm", self.score_norm, SCORE_NORMS)
        check_choice("ffn.router", self.router, ROUTER_KINDS)
        check_choice("ffn.d_wide_rounding", self.d_wide_rounding, WIDE_ROUNDING)
        check(self.aux_loss_coef >= 0, "ffn.aux_loss_coef", self.aux_loss_coef, "expected a number >= 0 (0 turns it off)")
        check(self.entropy_loss_coef >= 0, "ffn.entropy_loss_coef", self.entropy_loss_coef, "expected a number >= 0")
        check(0 < self.top_p <= 1, "ffn.top_p", self.top_p, "expected 0 < top_p <= 1")
        check(self.capacity_factor > 0, "ffn.capacity_factor", self.capacity_factor, "expected a number > 0")
        check(isinstance(self.d_wide_multiple, int) and self.d_wide_multiple >= 1, "ffn.d_wide_multiple",
              self.d_wide_multiple, "expected an integer >= 1")
        if self.kind == "dense":
            return
        check(isinstance(self.n_experts, int) and self.n_experts >= 1, "ffn.n_experts", self.n_experts,
              "expected an integer >= 1")
        check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.n_experts, "ffn.top_k", self.top_k,
              f"expected an integer from 1 to n_experts={self.n_experts}")
        if self.kind == "aoe":
            check(self.d_low is not None, "ffn.d_low", self.d_low, "AoE needs the low rank d_low (about d_model/3 works best)")
            check(self.router == "linear", "ffn.router", self.router, "AoE has no router; leave it at 'linear'")
        if self.d_low is not None:
            check(isinstance(self.d_low, int) and self.d_low >= 1, "ffn.d_low", self.d_low, "expected a positive integer")
        if self.d_wide is not None:
            check(isinstance(self.d_wide, int) and self.d_wide >= 1, "ffn.d_wide", self.d_wide, "expected a positive integer")
        if self.router_hidden is not None:
            check(self.router_hidden >= 1, "ffn.router_hidden", self.router_hidden, "expected a positive integer")

    # ----- derived sizes -------------------------------------------------------------------

    @property
    def factorized_gate(self) -> bool:
        return self.kind != "dense" and self.d_low is not None

    def expert_width(self, d_model: int) -> int:
        """Hidden width of one expert (d_ffn, or d_wide when the gate is factorised)."""
        if not self.factorized_gate:
            return self.d_ffn
        if self.d_wide is not None:
            return self.d_wide
        return matched_d_wide(d_model, self.d_ffn, self.d_low, self.d_wide_rounding, self.d_wide_multiple)

    def router_hidden_width(self, d_model: int) -> int:
        if self.router_hidden is not None:
            return self.router_hidden
        return large_router_hidden(d_model, self.n_experts, self.router_match_d_low)

    def validate_for(self, d_model: int) -> None:
        """Check the fields that depend on the model width."""
        if self.d_low is not None and self.kind != "dense":
            check(self.d_low < d_model, "ffn.d_low", self.d_low, f"expected d_low < d_model={d_model}")

    # ----- counting ------------------------------------------------------------------------

    def expert_params(self, d_model: int) -> int:
        width = self.expert_width(d_model)
        if self.factorized_gate:
            return d_model * self.d_low + self.d_low * width + 2 * d_model * width
        return 3 * d_model * width

    def router_params(self, d_model: int) -> int:
        if self.kind != "moe":
            return 0
        if self.router == "large":
            hidden = self.router_hidden_width(d_model)
            return d_model * hidden + hidden * self.n_experts
        return d_model * self.n_experts

    def num_params(self, d_model: int) -> int:
        if self.kind == "dense":
            return 3 * d_model * self.d_ffn
        return self.n_experts * self.expert_params(d_model) + self.router_params(d_model)

    def mean_active_experts(self) -> float:
        """Experts that finish the forward pass per token (exact for top-K and expert choice)."""
        if self.selection == "expert_choice":
            return min(float(self.n_experts), self.capacity_factor)
        # NOTE: top-P activates a data-dependent number of experts; counts use top_k as the
        # nominal value and the trainer logs the measured mean.
        return float(self.top_k)

    def scoring_params(self, d_model: int) -> int:
        """AoE's W_down of the experts that score a token but stop (used in FLOPs, not in active)."""
        if self.kind != "aoe":
            return 0
        return int(round((self.n_experts - self.mean_active_experts()) * d_model * self.d_low))

    def num_active_params(self, d_model: int) -> int:
        if self.kind == "dense":
            return self.num_params(d_model)
        return int(round(self.mean_active_experts() * self.expert_params(d_model))) + self.router_params(d_model)

    def forward_flops_per_token(self, d_model: int) -> int:
        return 2 * (self.num_active_params(d_model) + self.scoring_params(d_model))


@dataclass
class AttentionConfig:
    n_heads: int = 12
    n_kv_heads: int | None = None
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        check(isinstance(self.n_heads, int) and self.n_heads >= 1, "attention.n_heads", self.n_heads,
              "expected a positive integer")
        if self.n_kv_heads is not None:
            check(isinstance(self.n_kv_heads, int) and self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
                  "attention.n_kv_heads", self.n_kv_heads, f"expected a positive divisor of n_heads={self.n_heads}")
        check(self.rope_theta > 0, "attention.rope_theta", self.rope_theta, "expected a number > 0")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


@dataclass
class ModelConfig:
    """A Llama-style decoder: pre-RMSNorm, rotary embeddings, causal attention, and an FFN per layer."""

    vocab_size: int = 32000
    d_model: int = 768
    n_layers: int = 12
    max_seq_len: int = 1024
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig(**self.attention)
        if isinstance(self.ffn, dict):
            self.ffn = FFNConfig(**self.ffn)
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"model.{name}", value, "expected a positive integer")
        check(self.d_model % self.attention.n_heads == 0, "model.attention.n_heads", self.attention.n_heads,
              f"expected a divisor of d_model={self.d_model}")
        check((self.d_model // self.attention.n_heads) % 2 == 0, "model.attention.n_heads", self.attention.n_heads,
              "rotary embeddings need an even head dimension d_model/n_heads")
        check(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "expected a number > 0")
        check(self.init_std > 0, "model.init_std", self.init_std, "expected a number > 0")
        try:
            self.ffn.validate_for(self.d_model)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("invalid ffn.", "invalid model.ffn.", 1)) from None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention.n_heads

    def with_ffn(self, **changes) -> "ModelConfig":
        return replace(self, ffn=replace(self.ffn, **changes))

    # ----- counting ------------------------------------------------------------------------

    def attention_params(self) -> int:
        kv_dim = self.attention.kv_heads * self.head_dim
        return self.d_model * self.d_model * 2 + 2 * self.d_model * kv_dim

    def layer_params(self) -> int:
        return self.attention_params() + self.ffn.num_params(self.d_model) + 2 * self.d_model

    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model

    def num_params(self) -> int:
        head = 0 if self.tie_embeddings else self.embedding_params()
        return self.n_layers * self.layer_params() + self.embedding_params() + head + self.d_model

    def num_active_params(self) -> int:
        per_layer = self.attention_params() + self.ffn.num_active_params(self.d_model) + 2 * self.d_model
        return self.n_layers * per_layer + 2 * self.embedding_params() + self.d_model

    def forward_flops_per_token(self, seq_len: int | None = None) -> int:
        """Matmul FLOPs of one token's forward pass, attention scores included (causal average)."""
        seq_len = seq_len or self.max_seq_len
        per_layer = 2 * self.attention_params() + self.ffn.forward_flops_per_token(self.d_model)
        # QK^T and AV over on average half the context, because attention is causal.
        per_layer += 2 * 2 * self.d_model * seq_len // 2
        return self.n_layers * per_layer + 2 * self.embedding_params()

    def train_flops_per_token(self, seq_len: int | None = None) -> int:
        return 3 * self.forward_flops_per_token(seq_len)

    def parameter_report(self) -> dict[str, int]:
        return {
            "total_params": self.num_params(),
            "active_params": self.num_active_params(),
            "expert_width": self.ffn.expert_width(self.d_model) if self.ffn.kind != "dense" else self.ffn.d_ffn,
            "ffn_params_per_layer": self.ffn.num_params(self.d_model),
            "scoring_params_per_layer": self.ffn.scoring_params(self.d_model),
            "forward_flops_per_token": self.forward_flops_per_token(),
        }
