"""Expert selection as pure functions: scores in, (token, expert, weight) assignments out.

Shape legend:
    T  tokens in the flattened batch
    E  experts (n in the paper)
    K  experts each token keeps under top-K selection
    N  (token, expert) assignments; N = T*K for top-K, data-dependent otherwise
    L  low rank d_low of AoE's factorised gate

Scores are router logits for a router MoE and activation norms for AoE. Everything here runs in
fp32, because top-K ranking and softmax on bf16 scores flip near-ties and lose the small
differences between norms that AoE's selection depends on.

Ties are broken towards the lower expert index: selection ranks with a stable descending sort,
never with ``torch.topk``, whose tie order is unspecified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Selection:
    """The experts that finish each token's forward pass, and their gate weights."""

    token_idx: Tensor  # shape: (N,) int64
    expert_idx: Tensor  # shape: (N,) int64
    weight: Tensor  # shape: (N,) fp32
    mask_TE: Tensor  # shape: (T, E) bool, True where token t is assigned to expert e


@dataclass(frozen=True)
class RoutingStats:
    """Detached per-layer routing counters over the valid tokens of one forward pass.

    Sums rather than means, so that micro-batches and steps merge by addition.
    """

    tokens_per_expert: Tensor  # shape: (E,) assignments each expert received
    score_sum: Tensor  # shape: (E,) sum of each expert's score (AoE: its activation norm)
    confidence_entropy_sum: Tensor  # shape: () sum over tokens of the entropy of softmax(all scores)
    experts_per_token: Tensor  # shape: (E + 1,) histogram of how many experts each token got
    num_tokens: Tensor  # shape: () valid tokens

    def merge(self, other: "RoutingStats") -> "RoutingStats":
        return RoutingStats(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[Tensor, ...]:
        return (self.tokens_per_expert, self.score_sum, self.confidence_entropy_sum,
                self.experts_per_token, self.num_tokens)

    def summary(self) -> dict[str, float | list[float]]:
        """Ent_load, Ent_conf and the other per-layer statistics as plain numbers."""
        num_tokens = max(float(self.num_tokens), 1.0)
        load = self.tokens_per_expert.double()
        load_dist = load / load.sum().clamp_min(1.0)
        load_entropy = float(-(load_dist * load_dist.clamp_min(1e-30).log()).sum())
        hist = self.experts_per_token.double()
        mean_active = float((hist * torch.arange(hist.numel(), dtype=torch.float64)).sum() / hist.sum().clamp_min(1.0))
        return {
            "ent_load": load_entropy,
            "ent_conf": float(self.confidence_entropy_sum) / num_tokens,
            "load_fraction": (load / num_tokens).tolist(),
            "mean_score": (self.score_sum.double() / num_tokens).tolist(),
            "mean_active_experts": mean_active,
            "experts_per_token": hist.tolist(),
            "num_tokens": float(self.num_tokens),
        }


# ----- scores ------------------------------------------------------------------------------


def activation_norms(cache_TEL: Tensor, norm: str = "l2") -> Tensor:
    """Score each expert by the norm of its low-rank activation; returns fp32 (T, E)."""
    cache_TEL = cache_TEL.float()
    if norm == "l2":
        return torch.linalg.vector_norm(cache_TEL, ord=2, dim=-1)
    if norm == "l1":
        return torch.linalg.vector_norm(cache_TEL, ord=1, dim=-1)
    if norm == "linf":
        return torch.linalg.vector_norm(cache_TEL, ord=math.inf, dim=-1)
    raise ValueError(f"invalid score norm {norm!r}: expected 'l2', 'l1' or 'linf'")


def _rank_experts(scores_TE: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each token's scores descending; equal scores keep the lower expert index first."""
    # shape: (T, E) both
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True)


def _assignments_from_mask(mask_TE: Tensor, weight_TE: Tensor) -> Selection:
    # shape: (N,) both, in token-major order
    token_idx, expert_idx = mask_TE.nonzero(as_tuple=True)
    return Selection(token_idx, expert_idx, weight_TE[token_idx, expert_idx], mask_TE)


# ----- selection strategies ----------------------------------------------------------------


def select_top_k(scores_TE: Tensor, k: int, normalization: str = "softmax_top_k") -> Selection:
    """Token choice: every token keeps its K highest-scoring experts.

    ``softmax_top_k`` (the AoE paper and Mixtral) weights the K experts by a softmax over their
    K scores. With K = 1 that softmax is the constant 1 and the scores would get no gradient
    from the language-model loss, so K = 1 uses softmax(all scores) at the chosen expert, as
    the Switch Transformer does. ``top_k_softmax_all`` (the AoE authors' GPU snippet) always
    uses softmax over all E scores at the K chosen experts, so the weights sum to less than 1.
    """
    num_tokens, num_experts = scores_TE.shape
    scores_TE = scores_TE.float()

    # shape: (T, K)
    top_scores_TK, top_idx_TK = (t[:, :k] for t in _rank_experts(scores_TE))

    if normalization == "softmax_top_k" and k > 1:
        # shape: (T, K)
        weight_TK = torch.softmax(top_scores_TK, dim=-1)
    elif normalization in ("softmax_top_k", "top_k_softmax_all"):
        # shape: (T, K)
        weight_TK = torch.softmax(scores_TE, dim=-1).gather(1, top_idx_TK)
    else:
        raise ValueError(f"invalid gate normalization {normalization!r}: expected 'softmax_top_k' or 'top_k_softmax_all'")

    # shape: (T, E)
    mask_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=scores_TE.device)
    mask_TE.scatter_(1, top_idx_TK, True)

    # shape: (N,) with N = T*K, token-major
    token_idx = torch.arange(num_tokens, device=scores_TE.device).repeat_interleave(k)
    return Selection(token_idx, top_idx_TK.reshape(-1), weight_TK.reshape(-1), mask_TE)


def select_top_p(scores_TE: Tensor, p: float) -> Selection:
    """Top-P token choice: each token takes experts by descending score until their softmax mass reaches P.

    The expert that crosses P is included, so every token gets at least one expert. Weights are
    the selected probabilities renormalised to sum to 1, which equals a softmax over the
    selected scores.
    """
    scores_TE = scores_TE.float()

    # shape: (T, E)
    probs_TE = torch.softmax(scores_TE, dim=-1)
    sorted_probs_TE, order_TE = _rank_experts(probs_TE)
    mass_before_TE = sorted_probs_TE.cumsum(dim=-1) - sorted_probs_TE
    # With P = 1 every expert is kept, even where the fp32 running sum rounds to 1.0 before
    # the last experts (their probabilities below about 6e-8).
    keep_sorted_TE = mass_before_TE < p if p < 1 else torch.ones_like(mass_before_TE, dtype=torch.bool)
    keep_sorted_TE[:, 0] = True

    # shape: (T, E) in expert order
    mask_TE = torch.zeros_like(keep_sorted_TE).scatter(1, order_TE, keep_sorted_TE)
    kept_probs_TE = probs_TE * mask_TE
    weight_TE = kept_probs_TE / kept_probs_TE.sum(dim=-1, keepdim=True)
    return _assignments_from_mask(mask_TE, weight_TE)


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: capacity_factor * T / E, at most T."""
    return max(1, min(num_tokens, int(capacity_factor * num_tokens / num_experts)))


def select_expert_choice(scores_TE: Tensor, capacity_factor: float, valid_T: Tensor | None = None) -> Selection:
    """Expert choice: every expert takes its top-C tokens along the token axis.

    C = capacity_factor * T_valid / E. Padding tokens are never chosen. A token chosen by no
    expert passes through the residual connection only. Weights are softmax(all scores) of the
    token at the choosing expert, as in Zhou et al. (2022).
    """
    scores_TE = scores_TE.float()
    num_tokens, num_experts = scores_TE.shape
    num_valid = num_tokens if valid_T is None else int(valid_T.sum())
    if num_valid == 0:
        # expert_capacity takes at least one token, which here could only be padding.
        no_tokens_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=scores_TE.device)
        return _assignments_from_mask(no_tokens_TE, scores_TE)
    capacity = expert_capacity(num_valid, num_experts, capacity_factor)

    # shape: (T, E)
    probs_TE = torch.softmax(scores_TE, dim=-1)
    ranking_TE = scores_TE if valid_T is None else scores_TE.masked_fill(~valid_T[:, None], -math.inf)

    # shape: (E, C); stable sort so equal scores favour earlier tokens
    chosen_EC = torch.sort(ranking_TE.t(), dim=-1, descending=True, stable=True).indices[:, :capacity]

    # shape: (T, E)
    mask_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=scores_TE.device)
    mask_TE.scatter_(0, chosen_EC.t(), True)
    return _assignments_from_mask(mask_TE, probs_TE)


# ----- auxiliary losses --------------------------------------------------------------------


def load_balancing_loss(scores_TE: Tensor, mask_TE: Tensor, valid_T: Tensor | None = None, group=None) -> Tensor:
    """L_aux / alpha = E * sum_i f_i * P_i over the valid tokens, without the coefficient alpha.

    f_i is the fraction of tokens assigned to expert i (divided by T, not T*K), and P_i the mean
    over tokens of softmax(all scores)_i. Under perfectly uniform top-K routing f_i = K/E and
    P_i = 1/E, so the value is K; when every token picks the same K experts with confident
    scores it approaches E.

    With a process ``group``, f_i and P_i are taken over the tokens of all its ranks (see
    ``_load_balancing_loss_over_group``); every rank of the group must call this.
    """
    num_experts = scores_TE.shape[-1]
    # Softmax in fp32: the loss differentiates through these probabilities.
    probs_TE = torch.softmax(scores_TE.float(), dim=-1)
    mask_TE = mask_TE.float()
    if valid_T is not None:
        valid = valid_T.float()[:, None]
        num_valid = valid.sum().clamp_min(1.0)
        probs_TE = probs_TE * valid
        mask_TE = mask_TE * valid
    else:
        num_valid = torch.tensor(float(scores_TE.shape[0]), device=scores_TE.device).clamp_min(1.0)
    if group is not None:
        local_valid = valid_T.float().sum() if valid_T is not None else num_valid.new_tensor(float(scores_TE.shape[0]))
        return _load_balancing_loss_over_group(mask_TE.sum(dim=0), probs_TE.sum(dim=0), local_valid, group)

    # shape: (E,)
    fraction_E = mask_TE.sum(dim=0) / num_valid
    mean_prob_E = probs_TE.sum(dim=0) / num_valid
    return num_experts * (fraction_E * mean_prob_E).sum()


def _load_balancing_loss_over_group(count_E: Tensor, prob_sum_E: Tensor, num_valid: Tensor, group) -> Tensor:
    """E * sum_i f_i * P_i over the union of the group's batches, given this rank's sums.

    The counts carry no gradient, so summing them over the ranks is exact. P_i's local sum is
    multiplied by the world size W: each rank's value then differs, but their mean equals the
    whole-batch loss, and so does the gradient once data-parallel training averages it over
    the ranks.
    """
    num_experts = count_E.numel()
    # shape: (E + 1,) assignment counts, then the valid-token count
    totals = torch.cat([count_E, num_valid.reshape(1)]).detach()
    dist.all_reduce(totals, group=group)
    global_valid = totals[-1].clamp_min(1.0)
    fraction_E = totals[:-1] / global_valid
    mean_prob_E = prob_sum_E * dist.get_world_size(group) / global_valid
    return num_experts * (fraction_E * mean_prob_E).sum()


def selection_entropy(scores_TE: Tensor, valid_T: Tensor | None = None) -> Tensor:
    """Mean over valid tokens of the entropy of softmax(all scores); differentiable."""
    log_probs_TE = torch.log_softmax(scores_TE.float(), dim=-1)
    # shape: (T,)
    entropy_T = -(log_probs_TE.exp() * log_probs_TE).sum(dim=-1)
    if valid_T is None:
        return entropy_T.mean()
    valid = valid_T.float()
    return (entropy_T * valid).sum() / valid.sum().clamp_min(1.0)


@torch.no_grad()
def routing_stats(scores_TE: Tensor, selection: Selection, valid_T: Tensor | None = None) -> RoutingStats:
    """Collect the detached counters behind Ent_load, Ent_conf and the mean expert scores."""
    num_experts = scores_TE.shape[-1]
    scores_TE = scores_TE.float()
    valid = torch.ones(scores_TE.shape[0], device=scores_TE.device) if valid_T is None else valid_T.float()

    mask_TE = selection.mask_TE.float() * valid[:, None]
    log_probs_TE = torch.log_softmax(scores_TE, dim=-1)
    entropy_T = -(log_probs_TE.exp() * log_probs_TE).sum(dim=-1)

    # shape: (T,) experts per valid token, then a histogram over 0..E
    active_T = selection.mask_TE.sum(dim=-1)
    histogram = torch.zeros(num_experts + 1, device=scores_TE.device)
    histogram.index_add_(0, active_T, valid)

    return RoutingStats(
        tokens_per_expert=mask_TE.sum(dim=0),
        score_sum=(scores_TE * valid[:, None]).sum(dim=0),
        confidence_entropy_sum=(entropy_T * valid).sum(),
        experts_per_token=histogram,
        num_tokens=valid.sum(),
    )
