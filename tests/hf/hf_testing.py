"""Tiny models, a tiny tokenizer and run folders shared by the tests in tests/hf and tests/eval."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aoe.model.config import AttentionConfig, FFNConfig, ModelConfig
from aoe.model.decoder import Transformer

TEXT = ("The quick brown fox jumps over the lazy dog. A lady walks to a barbell and lifts it. "
        "Question: which gas do plants take in? Answer: carbon dioxide. ") * 20


def small_config(kind: str = "aoe", vocab_size: int = 300, tie: bool = True, **ffn_changes) -> ModelConfig:
    """Two layers, d_model 32, four experts top-2: big enough for routing, fast on a CPU."""
    d_low = ffn_changes.pop("d_low", 8 if kind == "aoe" else None)
    ffn = FFNConfig(kind=kind, d_ffn=48, n_experts=4, top_k=2, d_low=d_low, **ffn_changes)
    return ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, max_seq_len=64,
                       attention=AttentionConfig(n_heads=4), ffn=ffn, tie_embeddings=tie)


def build_model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    # Larger-than-init weights spread the logits, so that a wrong cache or mask shows up clearly.
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0)
    return model


def train_tokenizer():
    """A 300-id byte-level BPE trained on TEXT; trains in well under a second."""
    from aoe.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([TEXT], vocab_size=300, show_progress=False)


def write_run_dir(root: Path, model: Transformer, tokenizer=None, step: int = 5) -> Path:
    """A run folder in the trainer's layout: config.json, checkpoints/step_XXXXXXXX/, data/tokenizer."""
    from aoe.train.checkpoint import save_checkpoint
    from aoe.train.config import DataConfig, RunConfig

    run_dir = root / "run"
    data_dir = root / "data"
    if tokenizer is not None:
        tokenizer.save_pretrained(data_dir / "tokenizer")
    config = RunConfig(model=model.config, data=DataConfig(path=str(data_dir), seq_len=model.config.max_seq_len))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    # The trainer-state keys that checkpoint verification requires; their values do not matter here.
    state = {"micro_step": 0, "tokens_seen": 0, "loader": {}}
    save_checkpoint(run_dir, step, model, optimizer, state, {}, keep_last=1)
    return run_dir

