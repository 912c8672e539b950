"""Shared fixtures: a tiny run config and an in-memory stand-in for the aoe.data loaders."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from aoe.model.presets import tiny
from aoe.train.config import CheckpointConfig, DataConfig, OptimConfig, RunConfig, ScheduleConfig, TrainConfig
from aoe.train.trainer import DataSources

VOCAB = 64
SEQ_LEN = 32


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor


class FakeLoader:
    """Batches from a fixed token stream with a learnable pattern; resumable by position.

    Follows the PackedLoader contract the trainer relies on: iteration yields Batch forever and
    state_dict()/load_state_dict() resume at the next batch.
    """

    def __init__(self, batch_size: int, seq_len: int, seed: int = 0, vocab: int = VOCAB):
        generator = torch.Generator().manual_seed(seed)
        # Each sequence counts upward from a random start, so the next token is predictable.
        self.starts = torch.randint(0, vocab, (4096,), generator=generator)
        self.batch_size, self.seq_len, self.vocab = batch_size, seq_len, vocab
        self.position = 0

    def __iter__(self):
        while True:
            index = torch.arange(self.batch_size) + self.position * self.batch_size
            starts = self.starts[index % len(self.starts)]
            tokens = (starts[:, None] + torch.arange(self.seq_len + 1)) % self.vocab
            self.position += 1
            yield Batch(tokens[:, :-1].clone(), tokens[:, 1:].clone())

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def fake_data(config: RunConfig, eval_batches: int = 2) -> DataSources:
    loader = FakeLoader(config.data.micro_batch_size, config.data.seq_len, seed=config.data.seed)
    val_loader = iter(FakeLoader(config.data.micro_batch_size, config.data.seq_len, seed=1234))
    return DataSources(loader, [next(val_loader) for _ in range(eval_batches)])


def tiny_run_config(tmp_path, kind: str = "moe", vocab_size: int = VOCAB, **sections) -> RunConfig:
    """A seconds-long run: d_model 32, 2 layers, seq_len 32, vocabulary 64."""
    model = tiny(kind, vocab_size=vocab_size, d_low=8 if kind == "aoe" else None)
    model = type(model)(vocab_size=vocab_size, d_model=32, n_layers=2, max_seq_len=64,
                        attention=type(model.attention)(n_heads=2),
                        ffn=type(model.ffn)(**{**model.ffn.__dict__, "d_ffn": 32, "n_experts": 4}),
                        tie_embeddings=True)
    parts = dict(
        data=DataConfig(path=str(tmp_path / "data"), seq_len=SEQ_LEN, micro_batch_size=4, grad_accum_steps=2),
        optim=OptimConfig(lr=3e-3),
        schedule=ScheduleConfig(warmup_steps=2, max_steps=12, min_lr=3e-4),
        train=TrainConfig(log_interval=4, eval_interval=6, eval_batches=2, out_dir=str(tmp_path / "runs"),
                          tensorboard=False, progress=False, peak_flops=1e10, num_threads=1),
        checkpoint=CheckpointConfig(interval=4, keep_last=2),
    )
    for name, changes in sections.items():
        parts[name] = type(parts[name])(**{**parts[name].__dict__, **changes})
    return RunConfig(name=f"tiny-{kind}", model=model, **parts)


@pytest.fixture
def run_config(tmp_path):
    return tiny_run_config(tmp_path)


def write_corpus(folder, documents: int = 60, words_per_document: int = 300, seed: int = 0):
    """Write a small corpus of random sentences over a 17-word vocabulary, one document per file."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = "the cat sat on a mat and dog ran to big red house with small blue door".split()
    for index in range(documents):
        text = " ".join(rng.choice(words) for _ in range(words_per_document))
        (folder / f"doc{index:03d}.txt").write_text(text + "\n")
    return folder


def prepare_tiny_data(root, bpe_vocab_size: int = 300):
    """Prepare a tiny corpus with aoe.data (byte-level BPE of 300 tokens); return the data folder."""
    prepare = pytest.importorskip("aoe.data.prepare", reason="aoe.data.prepare is not available")
    corpus = write_corpus(root / "corpus")
    out = root / "prepared"
    prepare.prepare_corpus(out, input_path=str(corpus), bpe_vocab_size=bpe_vocab_size, val_fraction=0.1)
    return out


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))
