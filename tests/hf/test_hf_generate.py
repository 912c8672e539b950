"""Cached generation: every step equals a full forward, batches equal single prompts, no aux losses."""

from __future__ import annotations

import pytest
import torch

from aoe.hf import modeling_aoe
from aoe.hf.convert import to_hf_model
from hf_testing import build_model, small_config

PAD_ID = 0
PROMPTS = [[5, 17, 33, 91, 120, 7, 64, 250, 12], [40, 41, 42], [200, 13, 77, 150, 3, 9]]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def greedy(model, ids, mask, new_tokens: int = 5):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=PAD_ID, eos_token_id=None, output_logits=True,
                          return_dict_in_generate=True)


@pytest.fixture(scope="module", params=["aoe", "moe"])
def hf_model(request):
    return to_hf_model(build_model(small_config(request.param), seed=7))


def test_step_logits_equal_full_forward(hf_model):
    ids, mask = left_padded(PROMPTS)
    out = greedy(hf_model, ids, mask)
    sequences = out.sequences
    full_mask = torch.cat([mask, torch.ones(len(PROMPTS), sequences.shape[1] - ids.shape[1], dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = hf_model(sequences, attention_mask=full_mask, use_cache=False).logits
    assert len(out.logits) == 5
    for step, step_logits in enumerate(out.logits):
        position = ids.shape[1] - 1 + step
        # Cached and full attention reduce in different orders: fp32 rounding, well below 1e-4.
        torch.testing.assert_close(step_logits, full[:, position], rtol=1e-5, atol=1e-5, msg=f"step {step}")


def test_full_forward_of_padded_row_equals_unpadded(hf_model):
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        padded = hf_model(ids, attention_mask=mask, use_cache=False).logits
        for row, prompt in enumerate(PROMPTS):
            alone = hf_model(torch.tensor([prompt]), use_cache=False).logits[0]
            # SDPA takes a different CPU kernel with an explicit mask; the logits (up to about
            # 10 here) then differ by a few 1e-5. A wrong mask or position shifts them by ~1.
            torch.testing.assert_close(padded[row, -len(prompt):], alone, rtol=1e-4, atol=1e-4)


def test_batched_generate_equals_one_at_a_time(hf_model):
    ids, mask = left_padded(PROMPTS)
    batched = greedy(hf_model, ids, mask).sequences[:, ids.shape[1]:]
    for row, prompt in enumerate(PROMPTS):
        single_ids = torch.tensor([prompt])
        single = greedy(hf_model, single_ids, torch.ones_like(single_ids)).sequences[0, len(prompt):]
        assert batched[row].tolist() == single.tolist()


def test_generate_computes_no_aux_loss(hf_model, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("an auxiliary loss was computed")

    monkeypatch.setattr(modeling_aoe, "load_balancing_loss", fail)
    monkeypatch.setattr(modeling_aoe, "selection_entropy", fail)
    ids, mask = left_padded(PROMPTS)
    greedy(hf_model, ids, mask, new_tokens=2)
    with torch.inference_mode():
        out = hf_model(ids, attention_mask=mask, labels=ids)
    assert out.aux_loss is None
    with pytest.raises(AssertionError, match="auxiliary loss"):
        hf_model(ids, attention_mask=mask, labels=ids)
