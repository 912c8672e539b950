"""Held-out perplexity: token-weighted mean cross-entropy over evaluation batches."""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import islice

import torch
from tqdm import tqdm


@torch.no_grad()
def evaluate_perplexity(model, batches: Iterable, max_batches: int | None = None, device: str | torch.device = "cpu",
                        progress: bool = False) -> dict[str, float]:
    """Return {"loss", "ppl", "tokens"} of ``model`` over ``batches``.

    ``model`` is an ``aoe.model.decoder.Transformer`` (or anything whose forward takes
    ``(input_ids, labels=...)`` and returns ``ce_sum`` and ``num_valid``); ``batches`` yields
    objects with ``input_ids`` and next-token ``labels`` (-100 = ignore), such as
    ``aoe.data.loader.eval_batches``. The loss is the summed cross-entropy over all batches
    divided by their valid targets, so a short last batch counts by its tokens. Auxiliary
    routing losses are not included. The model's training mode is restored.
    """
    was_training = model.training
    model.eval()
    ce_sum = 0.0
    num_tokens = 0
    try:
        iterator = batches if max_batches is None else islice(batches, max_batches)
        for batch in tqdm(iterator, desc="Perplexity", disable=not progress, total=max_batches):
            out = model(batch.input_ids.to(device), labels=batch.labels.to(device))
            ce_sum += float(out.ce_sum)
            num_tokens += int(out.num_valid)
    finally:
        model.train(was_training)
    if num_tokens == 0:
        raise ValueError("no valid target tokens in the evaluation batches")
    loss = ce_sum / num_tokens
    return {"loss": loss, "ppl": math.exp(loss), "tokens": float(num_tokens)}
