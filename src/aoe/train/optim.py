"""AdamW with weight decay on weight matrices only."""

from __future__ import annotations

import torch
import torch.nn as nn

from aoe.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed and a non-decayed AdamW group.

    Decayed: every parameter with two or more dimensions (linear weights, the stacked expert
    banks, the router). Not decayed: norms, biases and embedding tables. A head tied to the
    embedding is the same tensor as the embedding, so it counts as an embedding. The split goes
    by module type and tensor rank, not by parameter names.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        if param.ndim >= 2 and id(param) not in embedding_ids:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """Build AdamW over ``param_groups``, with the fused kernel where torch has one for the device."""
    groups = param_groups(model, config.weight_decay)
    kwargs = dict(lr=config.lr, betas=config.betas, eps=config.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
