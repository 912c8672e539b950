"""Convert a trained router MoE into an Autonomy-of-Experts (AoE) model.

Shape legend:
    E  experts      D  d_model      H  expert width (d_ffn, kept as the AoE d_wide)
    L  d_low, the rank of the factorised gate projection

Each expert's gate projection W_g (D, H) is factorised by truncated SVD, W_g ≈ W_down W_up with
W_down = U_L sqrt(S_L) (D, L) and W_up = sqrt(S_L) V_L^T (L, H), which is the best rank-L
approximation in the Frobenius norm (Eckart–Young). The router is dropped; W_p, W_o, attention,
norms and embeddings are copied unchanged. The result is an aoe model folder: ``config.json``
({"model": ModelConfig with ffn.kind="aoe", d_wide = the original d_ffn, "converted_from": ...}),
``model.safetensors`` loadable by ``aoe.model.decoder.Transformer``, and the source's tokenizer
in ``tokenizer/`` when it has one.

Sources: an aoe MoE run or model folder (ffn.kind="moe"), or a Hugging Face Mixtral folder. A
Mixtral is first mapped exactly onto an aoe MoE Transformer (``hf_mixtral_to_moe``), which a
test checks logit for logit against transformers, and then converted like an aoe MoE.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from aoe.config_utils import to_dict
from aoe.model.config import AttentionConfig, FFNConfig, ModelConfig
from aoe.train.checkpoint import apply_default_permissions, atomic_write_text, unshared

Tensor = torch.Tensor


def svd_factorize(w_gate_DH: Tensor, d_low: int) -> tuple[Tensor, Tensor]:
    """Return (W_down (D, L), W_up (L, H)) with W_down W_up the best rank-L approximation of W_g."""
    rank_limit = min(w_gate_DH.shape)
    if not 1 <= d_low <= rank_limit:
        raise ValueError(f"invalid d_low={d_low}: expected 1 to min(d_model, d_ffn) = {rank_limit}")
    # float64 so that a full-rank factorisation reproduces W_g to fp32 rounding
    u_DR, s_R, vh_RH = torch.linalg.svd(w_gate_DH.double(), full_matrices=False)
    root_L = s_R[:d_low].sqrt()
    down_DL = u_DR[:, :d_low] * root_L
    up_LH = root_L[:, None] * vh_RH[:d_low]
    return down_DL.to(w_gate_DH.dtype), up_LH.to(w_gate_DH.dtype)


# ----- Hugging Face Mixtral -> aoe MoE ---------------------------------------------------------


def check_mixtral_supported(cfg) -> None:
    """Raise unless a transformers Mixtral config describes a model that aoe's decoder can run exactly."""
    if cfg.model_type != "mixtral":
        raise ValueError(f"invalid model_type={cfg.model_type!r}: conversion from Hugging Face supports 'mixtral'")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise NotImplementedError(f"head_dim={head_dim} with {cfg.num_attention_heads} heads does not give hidden_size="
                                  f"{cfg.hidden_size}; aoe's decoder derives head_dim = d_model / n_heads")
    if cfg.hidden_act != "silu" or cfg.sliding_window is not None:
        raise NotImplementedError(f"hidden_act={cfg.hidden_act!r} and sliding_window={cfg.sliding_window} are not "
                                  "supported: aoe's decoder uses SiLU experts and full causal attention")
    rope = cfg.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"rope_type={rope.get('rope_type')!r} is not supported; aoe's decoder uses plain RoPE")


def hf_mixtral_to_moe(model: nn.Module) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Map a transformers ``MixtralForCausalLM`` onto an aoe MoE Transformer's config and state dict."""
    cfg = model.config
    check_mixtral_supported(cfg)
    rope = cfg.rope_parameters or {}
    config = ModelConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
        max_seq_len=cfg.max_position_embeddings,
        attention=AttentionConfig(n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads,
                                  rope_theta=float(rope.get("rope_theta", 10000.0))),
        ffn=FFNConfig(kind="moe", d_ffn=cfg.intermediate_size, n_experts=cfg.num_local_experts,
                      top_k=cfg.num_experts_per_tok, aux_loss_coef=cfg.router_aux_loss_coef),
        tie_embeddings=bool(cfg.tie_word_embeddings), norm_eps=cfg.rms_norm_eps, init_std=cfg.initializer_range,
    )
    hf = model.state_dict()
    width = cfg.intermediate_size
    state = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
             "lm_head.weight": hf["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for hf_name, name in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            state[f"{dst}attn.{name}.weight"] = hf[f"{src}self_attn.{hf_name}.weight"]
        state[f"{dst}attn_norm.weight"] = hf[f"{src}input_layernorm.weight"]
        state[f"{dst}ffn_norm.weight"] = hf[f"{src}post_attention_layernorm.weight"]
        state[f"{dst}ffn.router.weight"] = hf[f"{src}mlp.gate.weight"]
        # shape: (E, 2H, D) fused, gate rows first -> (E, D, H) each, in x @ W layout
        gate_up = hf[f"{src}mlp.experts.gate_up_proj"]
        state[f"{dst}ffn.experts.w_gate"] = gate_up[:, :width].transpose(1, 2)
        state[f"{dst}ffn.experts.w_proj"] = gate_up[:, width:].transpose(1, 2)
        # shape: (E, D, H) -> (E, H, D)
        state[f"{dst}ffn.experts.w_out"] = hf[f"{src}mlp.experts.down_proj"].transpose(1, 2)
    return config, {k: v.detach().contiguous() for k, v in state.items()}


# ----- aoe MoE -> AoE --------------------------------------------------------------------------


def moe_to_aoe(config: ModelConfig, state: dict[str, Tensor], d_low: int, score_norm: str = "l2") -> tuple[ModelConfig, dict[str, Tensor]]:
    """Factorise every expert's W_g at rank ``d_low`` and drop the routers; returns the AoE config and state dict."""
    ffn = config.ffn
    if ffn.kind != "moe" or ffn.factorized_gate:
        raise ValueError(f"invalid source ffn.kind={ffn.kind!r}, d_low={ffn.d_low}: conversion needs a router MoE "
                         "with ordinary (unfactorised) gate projections")
    if ffn.selection != "top_k":
        raise NotImplementedError(f"converting selection={ffn.selection!r} is not supported; AoE here uses top-K")
    # AoE keeps every other selection setting of the source, and its experts keep their width.
    aoe_config = replace(config, ffn=replace(ffn, kind="aoe", d_low=d_low, d_wide=ffn.d_ffn, router="linear",
                                             router_hidden=None, score_norm=score_norm))
    converted = {}
    for name, tensor in state.items():
        if ".ffn.router." in name:
            continue
        if not name.endswith(".ffn.experts.w_gate"):
            converted[name] = tensor
            continue
        prefix = name[: -len("w_gate")]
        pairs = [svd_factorize(tensor[e], d_low) for e in range(tensor.shape[0])]
        # shape: (D, E, L) so that one matmul x @ W_down.view(D, E*L) scores every expert
        converted[prefix + "w_gate_down"] = torch.stack([down for down, _ in pairs], dim=1).contiguous()
        # shape: (E, L, H)
        converted[prefix + "w_gate_up"] = torch.stack([up for _, up in pairs]).contiguous()
    return aoe_config, converted


def gate_approximation_error(state: dict[str, Tensor], d_low: int) -> float:
    """Mean over experts and layers of ||W_g - W_down W_up||_F / ||W_g||_F, from the singular values."""
    ratios = []
    for name, tensor in state.items():
        if name.endswith(".ffn.experts.w_gate"):
            for w in tensor:
                s = torch.linalg.svdvals(w.double())
                ratios.append(float(s[d_low:].square().sum().sqrt() / s.square().sum().sqrt()))
    return float(np.mean(ratios))


# ----- loading and saving ----------------------------------------------------------------------


def load_moe_source(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor], Path | None]:
    """Read a router MoE as (aoe ModelConfig, aoe state dict, folder holding its tokenizer or None)."""
    from aoe.analysis.heldout import is_aoe_folder, load_aoe_folder

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder not found or without config.json: {path}")
    if is_aoe_folder(path):
        model = load_aoe_folder(path)
        config, state = model.config, model.state_dict()
    else:
        from transformers import AutoModelForCausalLM

        config, state = hf_mixtral_to_moe(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32))
    tokenizer_dir = next((d for d in (path / "tokenizer", path) if (d / "tokenizer.json").is_file()
                          or (d / "tokenizer.model").is_file()), None)
    return config, state, tokenizer_dir


def save_model_folder(out: str | Path, config: ModelConfig, state: dict[str, Tensor], metadata: dict,
                      tokenizer_dir: Path | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) and copy the tokenizer files."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".model.safetensors.tmp-{os.getpid()}"
    save_file(unshared(state), str(tmp))
    apply_default_permissions(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps({"model": to_dict(config), **metadata}, indent=1))
    if tokenizer_dir is not None:
        (out / "tokenizer").mkdir(exist_ok=True)
        for file in tokenizer_dir.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens")) and file.is_file():
                shutil.copy2(file, out / "tokenizer" / file.name)
    return out


def convert(source: str | Path, out: str | Path, d_low: int, score_norm: str = "l2") -> Path:
    """Convert the router MoE at ``source`` into an AoE model folder at ``out``; returns ``out``."""
    config, state, tokenizer_dir = load_moe_source(source)
    aoe_config, aoe_state = moe_to_aoe(config, state, d_low, score_norm)
    metadata = {"converted_from": str(source), "d_low": d_low,
                "gate_relative_error": gate_approximation_error(state, d_low)}
    return save_model_folder(out, aoe_config, aoe_state, metadata, tokenizer_dir)


# ----- short continued pre-training ------------------------------------------------------------


def continue_pretraining(model: nn.Module, tokens: np.ndarray, steps: int, batch_size: int = 8, seq_len: int = 128,
                         lr: float = 1e-3, warmup: int = 20, seed: int = 0) -> list[dict]:
    """Train an aoe Transformer for ``steps`` AdamW steps on random windows of ``tokens``; returns the loss curve.

    Linear warm-up for ``warmup`` steps, then cosine decay to lr/10; gradients clipped at 1.0.
    """
    from tqdm import tqdm

    if steps < 1:
        return []
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    curve = []
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="continued pre-training", unit="step"):
        if step < warmup:
            scale = (step + 1) / warmup
        else:
            scale = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
        window = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
        output = model(window[:, :-1], labels=window[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curve.append({"step": step, "loss": round(float(output.loss.detach()), 4),
                      "seconds": round(time.perf_counter() - start, 1)})
    model.eval()
    return curve
