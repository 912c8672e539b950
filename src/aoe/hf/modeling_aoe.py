"""Hugging Face causal-LM classes for aoe decoders: dense, router MoE and Autonomy-of-Experts.

Shape legend:
    B  batch        S  new tokens in this call     P  tokens already in the KV cache
    D  hidden size  V  vocabulary                  H  heads      G  key/value heads
    T  tokens = B*S E  experts                     K  experts kept per token
    N  (token, expert) assignments                 L  low rank d_low

This file is copied next to exported weights and loaded with ``trust_remote_code=True``, so it
must not import the ``aoe`` package. It restates the math of ``aoe.model.decoder`` and
``aoe.layers`` (rotary attention, selection, dispatch, SwiGLU experts) operation for operation,
with the same parameter names under a ``model.`` prefix. The tests in tests/hf compare logits
and per-layer expert selections with the native model, so a change on either side must be
made on both.

Differences from the native model, all for serving:
- attention takes a KV cache (``transformers.DynamicCache``), so ``generate`` decodes
  incrementally;
- auxiliary losses are computed only when ``labels`` are given and autograd is on, so
  ``generate`` and ``torch.no_grad`` evaluation never compute them;
- ``labels`` follow the Hugging Face convention (unshifted, -100 = ignore); the model shifts
  them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput, logging

from .configuration_aoe import AoEConfig

logger = logging.get_logger(__name__)
Tensor = torch.Tensor
IGNORE_INDEX = -100
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


@dataclass
class AoECausalLMOutput(ModelOutput):
    """Logits plus, on request, the per-layer expert scores and selections.

    ``cache`` is the name transformers 5 reads between generation steps and
    ``past_key_values`` the name transformers 4 reads; both refer to the same cache.
    """

    loss: Tensor | None = None  # mean cross-entropy over valid targets, plus aux_loss when computed
    logits: Tensor | None = None  # shape: (B, S, V) fp32
    cache: Cache | None = None
    past_key_values: Cache | None = None
    aux_loss: Tensor | None = None  # shape: () sum over layers; None when not computed
    expert_scores: tuple[Tensor, ...] | None = None  # per sparse layer, shape (T, E) fp32
    expert_masks: tuple[Tensor, ...] | None = None  # per sparse layer, shape (T, E) bool


# ----- rotary attention --------------------------------------------------------------------


def rotary_tables(head_dim: int, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """Cos and sin tables for ``positions`` (..., S); returns (..., S, Dh/2) each."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, S, Dh) by position, pairing the two halves of Dh (Llama's convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    # shape: (B or 1, 1, S, Dh/2) broadcast over heads
    cos, sin = cos[:, None], sin[:, None]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


class AoEAttention(nn.Module):
    def __init__(self, config: AoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, cache: Cache | None) -> Tensor:
        batch, seq, _ = x.shape
        # shape: (B, H, S, Dh) and (B, G, S, Dh)
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            # shape: (B, G, P+S, Dh); keys are cached after the rotation, at their own positions
            k, v = cache.update(k, v, self.layer_idx)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        # shape: (B, S, D)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


# ----- expert selection (pure functions, fp32) ---------------------------------------------


@dataclass(frozen=True)
class Selection:
    token_idx: Tensor  # shape: (N,)
    expert_idx: Tensor  # shape: (N,)
    weight: Tensor  # shape: (N,) fp32
    mask_TE: Tensor  # shape: (T, E) bool


def activation_norms(cache_TEL: Tensor, norm: str) -> Tensor:
    order = {"l2": 2, "l1": 1, "linf": math.inf}[norm]
    return torch.linalg.vector_norm(cache_TEL.float(), ord=order, dim=-1)


def _assignments_from_mask(mask_TE: Tensor, weight_TE: Tensor) -> Selection:
    # shape: (N,) both, token-major
    token_idx, expert_idx = mask_TE.nonzero(as_tuple=True)
    return Selection(token_idx, expert_idx, weight_TE[token_idx, expert_idx], mask_TE)


def select_top_k(scores_TE: Tensor, k: int, normalization: str) -> Selection:
    """Keep each token's K best experts; ties go to the lower expert index (stable sort)."""
    num_tokens, num_experts = scores_TE.shape
    scores_TE = scores_TE.float()
    # shape: (T, K)
    top_scores_TK, top_idx_TK = (t[:, :k] for t in torch.sort(scores_TE, dim=-1, descending=True, stable=True))
    if normalization == "softmax_top_k" and k > 1:
        weight_TK = torch.softmax(top_scores_TK, dim=-1)
    else:
        # K = 1 (or top_k_softmax_all): softmax over all E scores at the kept experts
        weight_TK = torch.softmax(scores_TE, dim=-1).gather(1, top_idx_TK)
    # shape: (T, E)
    mask_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=scores_TE.device)
    mask_TE.scatter_(1, top_idx_TK, True)
    token_idx = torch.arange(num_tokens, device=scores_TE.device).repeat_interleave(k)
    return Selection(token_idx, top_idx_TK.reshape(-1), weight_TK.reshape(-1), mask_TE)


def select_top_p(scores_TE: Tensor, p: float) -> Selection:
    """Take experts by descending softmax mass until it reaches P; the crossing expert is kept."""
    # shape: (T, E)
    probs_TE = torch.softmax(scores_TE.float(), dim=-1)
    sorted_probs_TE, order_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    keep_sorted_TE = (sorted_probs_TE.cumsum(dim=-1) - sorted_probs_TE) < p
    keep_sorted_TE[:, 0] = True
    mask_TE = torch.zeros_like(keep_sorted_TE).scatter(1, order_TE, keep_sorted_TE)
    kept_probs_TE = probs_TE * mask_TE
    return _assignments_from_mask(mask_TE, kept_probs_TE / kept_probs_TE.sum(dim=-1, keepdim=True))


def select_expert_choice(scores_TE: Tensor, capacity_factor: float, valid_T: Tensor | None) -> Selection:
    """Let every expert take its top capacity_factor*T_valid/E tokens; padding is never chosen."""
    scores_TE = scores_TE.float()
    num_tokens, num_experts = scores_TE.shape
    num_valid = num_tokens if valid_T is None else int(valid_T.sum())
    capacity = max(1, min(num_valid, int(capacity_factor * num_valid / num_experts)))
    probs_TE = torch.softmax(scores_TE, dim=-1)
    ranking_TE = scores_TE if valid_T is None else scores_TE.masked_fill(~valid_T[:, None], -math.inf)
    # shape: (E, C)
    chosen_EC = torch.sort(ranking_TE.t(), dim=-1, descending=True, stable=True).indices[:, :capacity]
    mask_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=scores_TE.device)
    mask_TE.scatter_(0, chosen_EC.t(), True)
    return _assignments_from_mask(mask_TE, probs_TE)


def load_balancing_loss(scores_TE: Tensor, mask_TE: Tensor, valid_T: Tensor | None) -> Tensor:
    """E * sum_i f_i * P_i over the valid tokens (f_i divided by T, so uniform top-K gives K)."""
    num_experts = scores_TE.shape[-1]
    probs_TE = torch.softmax(scores_TE.float(), dim=-1)
    mask_TE = mask_TE.float()
    if valid_T is not None:
        valid = valid_T.float()[:, None]
        num_valid = valid.sum().clamp_min(1.0)
        probs_TE, mask_TE = probs_TE * valid, mask_TE * valid
    else:
        num_valid = torch.tensor(float(scores_TE.shape[0]), device=scores_TE.device).clamp_min(1.0)
    return num_experts * ((mask_TE.sum(dim=0) / num_valid) * (probs_TE.sum(dim=0) / num_valid)).sum()


def selection_entropy(scores_TE: Tensor, valid_T: Tensor | None) -> Tensor:
    log_probs_TE = torch.log_softmax(scores_TE.float(), dim=-1)
    entropy_T = -(log_probs_TE.exp() * log_probs_TE).sum(dim=-1)
    if valid_T is None:
        return entropy_T.mean()
    valid = valid_T.float()
    return (entropy_T * valid).sum() / valid.sum().clamp_min(1.0)


# ----- FFN blocks --------------------------------------------------------------------------


class ExpertBank(nn.Module):
    """E SwiGLU experts as stacked tensors; a factorised gate when ``d_low`` is set."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, d_low: int | None):
        super().__init__()
        self.num_experts, self.d_model, self.d_low = num_experts, d_model, d_low
        if d_low is None:
            self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        else:
            self.w_gate_down = nn.Parameter(torch.empty(d_model, num_experts, d_low))
            self.w_gate_up = nn.Parameter(torch.empty(num_experts, d_low, hidden))
        self.w_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def expert_forward(self, expert: int, x_nD: Tensor, gate_low_nL: Tensor | None) -> Tensor:
        if self.d_low is not None:
            if gate_low_nL is None:
                gate_low_nL = x_nD @ self.w_gate_down[:, expert]
            gate_nH = gate_low_nL.to(x_nD.dtype) @ self.w_gate_up[expert]
        else:
            gate_nH = x_nD @ self.w_gate[expert]
        return (F.silu(gate_nH) * (x_nD @ self.w_proj[expert])) @ self.w_out[expert]

    def forward(self, x_ND: Tensor, counts: Tensor, gate_low_NL: Tensor | None) -> Tensor:
        sizes = counts.tolist()
        x_blocks = torch.split(x_ND, sizes)
        low_blocks = torch.split(gate_low_NL, sizes) if gate_low_NL is not None else [None] * len(sizes)
        outputs = [self.expert_forward(e, x, low) for e, (x, low) in enumerate(zip(x_blocks, low_blocks)) if x.shape[0]]
        if not outputs:
            return x_ND.new_zeros(0, self.d_model)
        return torch.cat(outputs, dim=0)


class DenseSwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_proj = nn.Linear(d_model, hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(F.silu(self.w_gate(x)) * self.w_proj(x))


class LargeRouter(nn.Module):
    """Two linear maps without a nonlinearity, D -> hidden -> E."""

    def __init__(self, d_model: int, hidden: int, num_experts: int):
        super().__init__()
        self.down = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(hidden, num_experts, bias=False)


@dataclass(frozen=True)
class FFNRouting:
    scores_TE: Tensor  # shape: (T, E) fp32
    mask_TE: Tensor  # shape: (T, E) bool
    aux_loss: Tensor | None  # shape: (); None when not computed


class SparseFFN(nn.Module):
    """score -> select -> dispatch -> experts -> combine, for the router MoE and for AoE."""

    def __init__(self, config: AoEConfig):
        super().__init__()
        self.config = config
        self.kind = config.ffn_kind
        self.d_model = config.hidden_size
        self.num_experts = config.num_experts
        self.experts = ExpertBank(config.num_experts, config.hidden_size, config.expert_hidden_size, config.d_low)
        if self.kind == "moe":
            if config.router == "large":
                self.router = LargeRouter(config.hidden_size, config.router_hidden_size, config.num_experts)
            else:
                self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def scores(self, x_TD: Tensor) -> tuple[Tensor, Tensor | None]:
        # Scores in fp32 even under autocast: bf16 flips near-tied top-K choices.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if self.kind == "moe":
                params = [p.float() for p in self.router.parameters()]
                if isinstance(self.router, LargeRouter):
                    return x_TD.float() @ params[0].t() @ params[1].t(), None
                return x_TD.float() @ params[0].t(), None
            # AoE: shape (T, E, L), one matmul scores every expert
            cache_TEL = x_TD.float() @ self.experts.w_gate_down.float().reshape(self.d_model, -1)
            cache_TEL = cache_TEL.view(-1, self.num_experts, self.config.d_low)
            return activation_norms(cache_TEL, self.config.score_norm), cache_TEL

    def select(self, scores_TE: Tensor, valid_T: Tensor | None) -> Selection:
        cfg = self.config
        if cfg.selection == "top_k":
            return select_top_k(scores_TE, cfg.num_experts_per_tok, cfg.gate_normalization)
        if cfg.selection == "top_p":
            return select_top_p(scores_TE, cfg.selection_top_p)
        return select_expert_choice(scores_TE, cfg.capacity_factor, valid_T)

    def auxiliary_loss(self, scores_TE: Tensor, selection: Selection, valid_T: Tensor | None) -> Tensor:
        cfg = self.config
        aux = scores_TE.new_zeros((), dtype=torch.float32)
        if cfg.selection != "expert_choice" and cfg.aux_loss_coef > 0:
            aux = aux + cfg.aux_loss_coef * load_balancing_loss(scores_TE, selection.mask_TE, valid_T)
        if cfg.selection == "top_p" and cfg.entropy_loss_coef > 0:
            aux = aux + cfg.entropy_loss_coef * selection_entropy(scores_TE, valid_T)
        return aux

    def forward(self, x: Tensor, valid_mask: Tensor | None, compute_aux: bool) -> tuple[Tensor, FFNRouting]:
        shape = x.shape
        # shape: (T, D)
        x_TD = x.reshape(-1, self.d_model)
        valid_T = None if valid_mask is None else valid_mask.reshape(-1).bool()

        # 1. score. shape: (T, E), and AoE's cache (T, E, L)
        scores_TE, cache_TEL = self.scores(x_TD)

        # 2. select
        selection = self.select(scores_TE, valid_T)

        # 3. dispatch. shape: (N, D), rows sorted by expert (stable, so token order is kept)
        order = torch.sort(selection.expert_idx, stable=True).indices
        token_idx, expert_idx = selection.token_idx[order], selection.expert_idx[order]
        counts = torch.bincount(expert_idx, minlength=self.num_experts)
        x_ND = x_TD[token_idx]
        low_NL = None if cache_TEL is None else cache_TEL[token_idx, expert_idx]

        # 4. experts. shape: (N, D)
        rows_ND = self.experts(x_ND, counts, low_NL)

        # 5. combine. shape: (T, D)
        weighted_ND = rows_ND * selection.weight[order].to(rows_ND.dtype)[:, None]
        out_TD = rows_ND.new_zeros(x_TD.shape[0], rows_ND.shape[-1]).index_add(0, token_idx, weighted_ND)

        aux = self.auxiliary_loss(scores_TE, selection, valid_T) if compute_aux else None
        return out_TD.view(shape), FFNRouting(scores_TE, selection.mask_TE, aux)


class AoEBlock(nn.Module):
    def __init__(self, config: AoEConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = AoEAttention(config, layer_idx)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.ffn_kind == "dense":
            self.ffn = DenseSwiGLU(config.hidden_size, config.intermediate_size)
        else:
            self.ffn = SparseFFN(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, cache: Cache | None,
                valid_mask: Tensor | None, compute_aux: bool) -> tuple[Tensor, FFNRouting | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, SparseFFN):
            out, routing = self.ffn(h, valid_mask, compute_aux)
        else:
            out, routing = self.ffn(h), None
        return x + out, routing


# ----- models ------------------------------------------------------------------------------


def attention_mask_4d(attention_mask: Tensor | None, batch: int, seq: int, past: int, device) -> Tensor | None:
    """Boolean (B, 1, S, P+S) mask for causal attention over cached and new keys, or None.

    None means plain causal attention (no cache, no padding), which SDPA does with
    ``is_causal``. A query always keeps its own key, so a padding query never meets an
    all-masked row (the native model does the same).
    """
    no_padding = attention_mask is None or bool(attention_mask.bool().all())
    if past == 0 and no_padding:
        return None
    # shape: (S, P+S)
    query_pos = torch.arange(past, past + seq, device=device)[:, None]
    key_pos = torch.arange(past + seq, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None].expand(batch, -1, -1)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | (key_pos == query_pos)[None]
    return allowed[:, None]


class AoEPreTrainedModel(PreTrainedModel):
    config_class = AoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["AoEBlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, ExpertBank):
            for param in module.parameters(recurse=False):
                nn.init.normal_(param, std=std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)


class AoEModel(AoEPreTrainedModel):
    def __init__(self, config: AoEConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(AoEBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._warned_expert_choice = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Cache | None = None, use_cache: bool = False, valid_mask: Tensor | None = None,
                compute_aux: bool = False) -> tuple[Tensor, Cache | None, list[FFNRouting | None]]:
        """Return the final hidden states (B, S, D), the cache and each layer's routing.

        attention_mask: (B, P+S), 1 for real tokens, covering cached and new tokens.
        position_ids default to the running count of real tokens (left padding starts at 0).
        """
        batch, seq = input_ids.shape
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if past + seq > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {past + seq} exceeds max_position_embeddings={self.config.max_position_embeddings}")
        if past > 0 and self.config.selection == "expert_choice" and not self._warned_expert_choice:
            logger.warning("expert_choice selection ranks the tokens of each forward call, so cached decoding "
                           "selects differently from a full forward over the same tokens")
            self._warned_expert_choice = True

        if attention_mask is not None and valid_mask is None:
            valid_mask = attention_mask[:, -seq:].bool()
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq:]
            else:
                position_ids = torch.arange(past, past + seq, device=input_ids.device)[None]
        cos, sin = rotary_tables(self.config.head_dim, position_ids, self.config.rope_theta)
        attn_mask = attention_mask_4d(attention_mask, batch, seq, past, input_ids.device)

        # shape: (B, S, D)
        x = self.embed(input_ids)
        routing = []
        for block in self.layers:
            x, layer_routing = block(x, cos, sin, attn_mask, cache, valid_mask, compute_aux)
            routing.append(layer_routing)
        return self.norm(x), cache, routing


class AoEForCausalLM(AoEPreTrainedModel, GenerationMixin):
    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: AoEConfig):
        super().__init__(config)
        self.model = AoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: Cache | None = None, past_key_values: Cache | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, output_expert_selection: bool = False, return_dict: bool | None = None,
                **kwargs) -> AoECausalLMOutput:
        """Run the decoder; ``labels`` (B, S) are unshifted targets with -100 = ignore.

        The auxiliary routing losses are added to ``loss`` only when labels are given and
        autograd is enabled. Under ``torch.no_grad`` (evaluation, ``generate``) no auxiliary
        loss is computed, and ``loss`` is the cross-entropy alone.
        """
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        shift_labels = None
        valid_mask = None
        if labels is not None:
            # shape: (B, S) the target of position t is token t+1
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            if attention_mask is None:
                valid_mask = shift_labels != IGNORE_INDEX
        compute_aux = labels is not None and torch.is_grad_enabled()

        hidden, cache, routing = self.model(input_ids, attention_mask, position_ids, cache, use_cache,
                                            valid_mask, compute_aux)
        # shape: (B, S, V) fp32 for a stable log-softmax
        logits = self.lm_head(hidden).float()

        loss = aux_loss = None
        sparse = [r for r in routing if r is not None]
        if compute_aux and sparse:
            aux_loss = torch.stack([r.aux_loss for r in sparse]).sum()
        if shift_labels is not None:
            ce_sum = F.cross_entropy(logits.view(-1, logits.shape[-1]), shift_labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum")
            loss = ce_sum / (shift_labels != IGNORE_INDEX).sum().clamp_min(1)
            if aux_loss is not None:
                loss = loss + aux_loss
        return AoECausalLMOutput(
            loss=loss,
            logits=logits,
            cache=cache,
            past_key_values=cache,
            aux_loss=aux_loss,
            expert_scores=tuple(r.scores_TE for r in sparse) if output_expert_selection else None,
            expert_masks=tuple(r.mask_TE for r in sparse) if output_expert_selection else None,
        )
