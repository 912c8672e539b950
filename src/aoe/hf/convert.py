"""Convert a native ``aoe.model.decoder.Transformer`` into the Hugging Face ``AoEForCausalLM``.

The Hugging Face classes keep the native parameter names under a ``model.`` prefix (the output
head stays ``lm_head``), so conversion renames keys and copies tensors. Derived sizes are
resolved here from the native ``ModelConfig``.
"""

from __future__ import annotations

import torch

from aoe.hf.configuration_aoe import AoEConfig
from aoe.hf.modeling_aoe import AoEForCausalLM
from aoe.model.config import ModelConfig
from aoe.model.decoder import Transformer


def hf_config(config: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None) -> AoEConfig:
    """Build the ``AoEConfig`` of a native model config, with every derived width resolved."""
    ffn = config.ffn
    sparse = ffn.kind != "dense"
    return AoEConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.attention.n_heads,
        num_key_value_heads=config.attention.kv_heads,
        max_position_embeddings=config.max_seq_len,
        rope_theta=config.attention.rope_theta,
        rms_norm_eps=config.norm_eps,
        initializer_range=config.init_std,
        ffn_kind=ffn.kind,
        intermediate_size=ffn.d_ffn,
        expert_hidden_size=ffn.expert_width(config.d_model) if sparse else ffn.d_ffn,
        num_experts=ffn.n_experts,
        num_experts_per_tok=ffn.top_k,
        d_low=ffn.d_low if sparse else None,
        selection=ffn.selection,
        selection_top_p=ffn.top_p,
        capacity_factor=ffn.capacity_factor,
        gate_normalization=ffn.gate_normalization,
        score_norm=ffn.score_norm,
        router=ffn.router,
        router_hidden_size=ffn.router_hidden_width(config.d_model) if ffn.kind == "moe" and ffn.router == "large" else None,
        aux_loss_coef=ffn.aux_loss_coef,
        entropy_loss_coef=ffn.entropy_loss_coef,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def hf_state_dict(native_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename native parameter keys to the Hugging Face layout (``model.`` prefix, ``lm_head`` kept)."""
    return {(key if key.startswith("lm_head.") else f"model.{key}"): value for key, value in native_state.items()}


def to_hf_model(model: Transformer, bos_token_id: int | None = None, eos_token_id: int | None = None,
                pad_token_id: int | None = None) -> AoEForCausalLM:
    """Return an fp32 ``AoEForCausalLM`` in eval mode holding copies of ``model``'s weights."""
    config = hf_config(model.config, bos_token_id, eos_token_id, pad_token_id)
    hf_model = AoEForCausalLM(config)
    missing, unexpected = hf_model.load_state_dict(hf_state_dict(model.state_dict()), strict=False)
    # A tied head shares the embedding tensor, so its key may be reported as missing.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"native and Hugging Face parameters differ: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        hf_model.tie_weights()
    return hf_model.float().eval()
