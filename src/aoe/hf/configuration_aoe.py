"""Hugging Face config for aoe decoders (dense, router MoE and Autonomy-of-Experts FFNs).

This file is copied next to exported weights and loaded with ``trust_remote_code=True``, so it
imports only ``transformers`` and never the ``aoe`` package. Derived sizes (the
expert width ``expert_hidden_size`` and the large router's width) are stored resolved, so the
modeling file needs no parameter-matching arithmetic.
"""

from __future__ import annotations

from transformers import PretrainedConfig

FFN_KINDS = ("dense", "moe", "aoe")
SELECTIONS = ("top_k", "top_p", "expert_choice")
GATE_NORMALIZATIONS = ("softmax_top_k", "top_k_softmax_all")
SCORE_NORMS = ("l2", "l1", "linf")
ROUTER_KINDS = ("linear", "large")


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"invalid {name}={value!r}: expected one of {allowed}")


class AoEConfig(PretrainedConfig):
    """A pre-RMSNorm rotary decoder whose FFN is a dense SwiGLU, a router MoE or an AoE layer.

    ``intermediate_size`` is the dense FFN width (and a router-MoE expert's width before any
    gate factorisation); ``expert_hidden_size`` is the width each expert actually has.
    ``selection_top_p`` is the top-P routing threshold (``top_p`` would clash with the
    generation setting of that name).
    ``d_low`` set means a factorised gate W_g = W_down W_up (always for AoE).
    """

    model_type = "aoe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        ffn_kind: str = "dense",
        intermediate_size: int = 3072,
        expert_hidden_size: int | None = None,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        d_low: int | None = None,
        selection: str = "top_k",
        selection_top_p: float = 0.6,
        capacity_factor: float = 2.0,
        gate_normalization: str = "softmax_top_k",
        score_norm: str = "l2",
        router: str = "linear",
        router_hidden_size: int | None = None,
        aux_loss_coef: float = 0.01,
        entropy_loss_coef: float = 1e-4,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        _check_choice("ffn_kind", ffn_kind, FFN_KINDS)
        _check_choice("selection", selection, SELECTIONS)
        _check_choice("gate_normalization", gate_normalization, GATE_NORMALIZATIONS)
        _check_choice("score_norm", score_norm, SCORE_NORMS)
        _check_choice("router", router, ROUTER_KINDS)
        if hidden_size % num_attention_heads != 0:
            raise ValueError(f"invalid num_attention_heads={num_attention_heads}: expected a divisor of hidden_size={hidden_size}")
        if ffn_kind == "aoe" and d_low is None:
            raise ValueError("invalid d_low=None: an AoE FFN needs the low rank d_low")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.ffn_kind = ffn_kind
        self.intermediate_size = intermediate_size
        self.expert_hidden_size = expert_hidden_size or intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.d_low = d_low
        self.selection = selection
        self.selection_top_p = selection_top_p
        self.capacity_factor = capacity_factor
        self.gate_normalization = gate_normalization
        self.score_norm = score_norm
        self.router = router
        self.router_hidden_size = router_hidden_size
        self.aux_loss_coef = aux_loss_coef
        self.entropy_loss_coef = entropy_loss_coef
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
