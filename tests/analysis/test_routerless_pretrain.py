"""The tiny Mixtral pre-training script: novel split, schedule, tokenization and one short run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from aoe.analysis.mixtral_pretrain import (PretrainConfig, encode_documents, learning_rate, pretrain, split_novels,
                                           train_tokenizer)

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen.\r\n\r\n"
        "The hallway smelt of boiled cabbage and old rag mats.\r\n") * 20


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "novels"
    folder.mkdir()
    for i in range(5):
        (folder / f"novel_{i}.txt").write_text("\ufeff" + TEXT.replace("April", f"month {i}"), encoding="utf-8")
    return folder


def test_split_novels_is_seeded_and_disjoint(corpus):
    train, val = split_novels(corpus, 2, seed=0)
    assert len(val) == 2
    assert len(train) == 3
    assert not set(train) & set(val)
    assert split_novels(corpus, 2, seed=0) == (train, val)


def test_split_novels_needs_enough_files(corpus):
    with pytest.raises(ValueError, match="val_novels=5"):
        split_novels(corpus, 5, seed=0)


def test_learning_rate_warmup_then_cosine():
    cfg = PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert learning_rate(0, 110, 0.0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, 110, 0.0, cfg) == pytest.approx(1.0)
    assert learning_rate(60, 110, 0.0, cfg) == pytest.approx(0.55)
    assert learning_rate(110, 110, 0.0, cfg) == pytest.approx(0.1)
    # The time budget takes over when it is further along than the step count.
    assert learning_rate(20, 110, 1.0, cfg) == pytest.approx(0.1)
    assert learning_rate(20, 110, 0.5, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_documents_are_framed_by_bos_and_eos():
    tokenizer = train_tokenizer([TEXT.replace("\r\n", "\n")], vocab_size=300, max_chars=10_000)
    ids = encode_documents(tokenizer, ["one line\n\ntwo lines", "three"])
    assert ids.dtype == np.uint16
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    assert int((ids == tokenizer.bos_token_id).sum()) == 2
    assert "two lines" in tokenizer.decode(ids.tolist())


def test_short_pretraining_run_saves_loadable_model(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = PretrainConfig(corpus=str(corpus), out_dir=str(tmp_path / "run"), vocab_size=300, hidden_size=32,
                         intermediate_size=16, num_layers=1, num_heads=2, num_experts=4, seq_len=16, batch_size=2,
                         token_budget=96, warmup_steps=1, val_novels=1)
    out = pretrain(cfg)
    record = json.loads((out / "pretrain.json").read_text())
    assert record["steps"] == 3
    assert record["tokens_seen"] == 3 * 2 * 16
    assert len(record["config"]["held_out_novels"]) == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_local_experts == 4
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[0, 5, 7]])).logits
    assert logits.shape == (1, 3, len(transformers.AutoTokenizer.from_pretrained(str(out))))
