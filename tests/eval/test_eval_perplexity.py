"""Held-out perplexity is the token-weighted mean cross-entropy over all batches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from aoe.eval.perplexity import evaluate_perplexity
from hf_testing import build_model, small_config


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor


def test_perplexity_weights_batches_by_tokens():
    model = build_model(small_config("aoe"), seed=2)
    model.train()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for rows, ignored in ((2, 0), (1, 9)):
        ids = torch.randint(0, 300, (rows, 12), generator=generator)
        labels = torch.randint(0, 300, (rows, 12), generator=generator)
        labels[0, :ignored] = -100
        batches.append(Batch(ids, labels))

    result = evaluate_perplexity(model, batches)
    assert model.training

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model.eval()(batch.input_ids).logits
            total += F.cross_entropy(logits.reshape(-1, 300), batch.labels.reshape(-1), ignore_index=-100,
                                     reduction="sum").item()
            count += int((batch.labels != -100).sum())
    assert result["tokens"] == count == 24 + 12 - 9
    assert result["loss"] == pytest.approx(total / count, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_perplexity_restores_training_mode_and_rejects_empty():
    model = build_model(small_config("dense"))
    model.train()
    labels = torch.full((1, 4), -100)
    with pytest.raises(ValueError, match="no valid target"):
        evaluate_perplexity(model, [Batch(torch.zeros(1, 4, dtype=torch.long), labels)])
    assert model.training
