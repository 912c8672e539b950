"""Gradient accumulation: normalised by the valid targets of the whole optimizer step."""

from __future__ import annotations

import pytest
import torch

from aoe.model.decoder import IGNORE_INDEX, Transformer
from aoe.train.optim import build_optimizer, param_groups
from aoe.train.trainer import _Loop, forward_backward

from conftest import Batch, fake_data, tiny_run_config


def build_model(tmp_path, kind="moe", **ffn):
    config = tiny_run_config(tmp_path, kind=kind)
    model_config = config.model.with_ffn(**ffn) if ffn else config.model
    torch.manual_seed(0)
    return Transformer(model_config).double()


def random_batches(sizes_and_masks, vocab=64, seq_len=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size, keep in sizes_and_masks:
        ids = torch.randint(0, vocab, (size, seq_len), generator=generator)
        labels = torch.randint(0, vocab, (size, seq_len), generator=generator)
        labels[torch.rand(size, seq_len, generator=generator) > keep] = IGNORE_INDEX
        batches.append(Batch(ids, labels))
    return batches


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["dense", "moe", "aoe"])
def test_accumulation_equals_one_big_batch(tmp_path, kind):
    # No aux losses: the load-balancing loss of a union is not the weighted mean of the parts.
    ffn = {} if kind == "dense" else {"aux_loss_coef": 0.0, "entropy_loss_coef": 0.0}
    model = build_model(tmp_path, kind, **ffn)
    # Micro-batches with very different numbers of valid targets.
    micro = random_batches([(2, 1.0), (3, 0.2), (1, 0.6)])
    step = forward_backward(model, micro)
    accumulated = grads(model)
    model.zero_grad()

    big = Batch(torch.cat([b.input_ids for b in micro]), torch.cat([b.labels for b in micro]))
    out = model(big.input_ids, labels=big.labels)
    (out.ce_sum / out.num_valid).backward()
    reference = grads(model)

    assert step.num_valid == int(out.num_valid)
    # The decoder computes logits and cross-entropy in fp32 even for a float64 model.
    assert step.ce_loss == pytest.approx(float(out.ce_sum.detach() / out.num_valid), rel=1e-6)
    assert accumulated.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(accumulated[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_aux_loss_weighted_by_valid_share(tmp_path):
    model = build_model(tmp_path, "moe", aux_loss_coef=0.5)
    micro = random_batches([(2, 1.0), (2, 0.25)], seed=1)
    step = forward_backward(model, micro)
    model.zero_grad()
    with torch.no_grad():
        outs = [model(b.input_ids, labels=b.labels) for b in micro]
    counts = [int(o.num_valid) for o in outs]
    expected_aux = sum(float(o.aux_loss) * n for o, n in zip(outs, counts)) / sum(counts)
    expected_ce = sum(float(o.ce_sum) for o in outs) / sum(counts)
    assert counts[0] > 2 * counts[1]
    assert step.aux_loss == pytest.approx(expected_aux, rel=1e-6)
    assert step.loss == pytest.approx(expected_ce + expected_aux, rel=1e-6)


def test_micro_batch_without_targets_adds_nothing(tmp_path):
    model = build_model(tmp_path, "aoe")
    micro = random_batches([(2, 1.0), (2, 0.5)], seed=2)
    empty = random_batches([(2, 0.0)], seed=3)[0]
    assert int((empty.labels != IGNORE_INDEX).sum()) == 0

    with_empty = forward_backward(model, [micro[0], empty, micro[1]])
    grads_with_empty = grads(model)
    model.zero_grad()
    without = forward_backward(model, micro)
    assert with_empty.loss == pytest.approx(without.loss, rel=1e-6)
    for name, grad in grads(model).items():
        assert torch.isfinite(grads_with_empty[name]).all()
        torch.testing.assert_close(grads_with_empty[name], grad, rtol=1e-12, atol=0)


def test_step_without_targets_does_no_update(tmp_path):
    config = tiny_run_config(tmp_path)
    data = fake_data(config)
    loop = _Loop(config, tmp_path, torch.device("cpu"), data)
    before = {n: p.detach().clone() for n, p in loop.model.named_parameters()}
    empty = random_batches([(4, 0.0), (4, 0.0)], seq_len=32)
    result = loop.train_step(iter(empty))
    assert result is None
    assert all(torch.equal(p, before[n]) for n, p in loop.model.named_parameters())
    assert all(p.grad is None for p in loop.model.parameters())
    assert loop.optimizer.state == {} or all(len(s) == 0 for s in loop.optimizer.state.values())

    micro = random_batches([(4, 0.0), (4, 1.0)], seq_len=32)
    result = loop.train_step(iter(micro))
    assert result.num_valid == 4 * 32
    assert result.loss > 3.0
    assert not torch.equal(loop.model.embed.weight, before["embed.weight"])


def test_weight_decay_groups(tmp_path):
    model = build_model(tmp_path, "moe")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert "layers.0.ffn.router.weight" in decayed
    assert "layers.0.attn.wq.weight" in decayed
    assert "layers.1.ffn.experts.w_out" in decayed
    # The tied head is the embedding table and is not decayed.
    assert "embed.weight" in kept
    assert "layers.0.attn_norm.weight" in kept
    assert "norm.weight" in kept
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_bf16_autocast_step_runs(tmp_path):
    # AoE with the odd matched d_wide of this tiny config, the case grouped matmuls find hardest.
    model = build_model(tmp_path, "aoe").float()
    micro = random_batches([(1, 1.0)], seq_len=8)
    fp32 = forward_backward(model, micro, "fp32")
    model.zero_grad()
    bf16 = forward_backward(model, micro, "bf16")
    # bf16 matmuls keep about 3 significant digits; the loss is ln(64) = 4.16 at init.
    assert bf16.loss == pytest.approx(fp32.loss, rel=2e-2)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    optimizer = build_optimizer(model, tiny_run_config(tmp_path).optim)
    optimizer.step()
