"""Pre-train a small Mixtral (transformers' own ``MixtralForCausalLM``) as the test subject of the
router-free study and of the MoE -> AoE conversion.

The model is a router MoE that we trained ourselves, so we know exactly which text it never saw:
whole novels are held out of training (the validation split), and WikiText-2 valid is a second
held-out set from another domain. The output folder is a Hugging Face model folder
(``config.json``, ``model.safetensors``, tokenizer files) plus:

- ``pretrain.json``: the token budget, the wall-clock time, the training and held-out novels
  and the loss curve;
- ``tokens/train.npy`` and ``tokens/val.npy``: the tokenized corpus splits (uint16), each
  document written as BOS + tokens + EOS.

The tokenizer is a byte-level BPE trained on the training novels only. Its small vocabulary keeps
the output head cheap on a CPU, because the head is the largest matmul of a 128-wide model.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aoe.train.checkpoint import atomic_write_text

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


@dataclass
class PretrainConfig:
    corpus: str = "/work/shared/data/corpus/100_english_novels"
    out_dir: str = "runs/mixtral-tiny"
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    seq_len: int = 128
    batch_size: int = 8
    # Training stops after this many tokens or after max_minutes, whichever comes first; the
    # cosine schedule follows whichever of the two is further along.
    token_budget: int = 600_000
    max_minutes: float = 20.0
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    router_aux_loss_coef: float = 0.01
    val_novels: int = 3
    # BPE training reads at most this many characters of the training novels, and training
    # samples its windows from the first train_chars characters of the shuffled novels (whole
    # novels, so about 3M tokens by default: several times the token budget).
    tokenizer_chars: int = 20_000_000
    train_chars: int = 12_000_000
    seed: int = 0
    # One thread: on a CPU shared with other jobs, two threads were about 4x slower per step.
    threads: int = 1
    held_out_novels: list[str] = field(default_factory=list)


def read_novel(path: Path) -> str:
    """Read a novel as text; the files are UTF-8 with a BOM and CRLF line endings."""
    return path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")


def split_novels(corpus: Path, val_novels: int, seed: int) -> tuple[list[Path], list[Path]]:
    """Return (train, val) novel paths; the val novels are a seeded random choice of whole files."""
    novels = sorted(corpus.glob("*.txt"))
    if len(novels) <= val_novels:
        raise ValueError(f"corpus {corpus} has {len(novels)} .txt files; need more than val_novels={val_novels}")
    held_out = set(random.Random(seed).sample(range(len(novels)), val_novels))
    train = [p for i, p in enumerate(novels) if i not in held_out]
    val = [p for i, p in enumerate(novels) if i in held_out]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int, max_chars: int):
    """Train a byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast`` with <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def sample():
        used = 0
        for text in texts:
            for paragraph in text.split("\n\n"):
                if used >= max_chars:
                    return
                used += len(paragraph)
                yield paragraph

    tokenizer.train_from_iterator(sample(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def encode_documents(tokenizer, texts: list[str]) -> np.ndarray:
    """Encode each document as BOS + tokens + EOS and concatenate; returns uint16 ids."""
    pieces = []
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for text in tqdm(texts, desc="tokenize", unit="doc"):
        ids = [tokenizer.bos_token_id]
        for encoded in tokenizer(text.split("\n\n"), add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.extend(separator)
        ids.append(tokenizer.eos_token_id)
        pieces.append(np.asarray(ids, dtype=np.uint16))
    return np.concatenate(pieces)


def prepare_tokens(cfg: PretrainConfig, out: Path, train_paths: list[Path], val_paths: list[Path]):
    """Train the tokenizer and tokenize both splits, or reuse them from an earlier run in ``out``."""
    from transformers import PreTrainedTokenizerFast

    token_files = (out / "tokens" / "train.npy", out / "tokens" / "val.npy")
    if (out / "tokenizer.json").exists() and all(f.exists() for f in token_files):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
        return np.load(token_files[0]), np.load(token_files[1]), tokenizer
    train_texts = [read_novel(p) for p in train_paths]
    random.Random(cfg.seed).shuffle(train_texts)
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size, cfg.tokenizer_chars)
    tokenizer.save_pretrained(out)
    used, kept = 0, []
    for text in train_texts:
        if used >= cfg.train_chars:
            break
        kept.append(text)
        used += len(text)
    train_tokens = encode_documents(tokenizer, kept)
    val_tokens = encode_documents(tokenizer, [read_novel(p) for p in val_paths])
    np.save(token_files[0], train_tokens)
    np.save(token_files[1], val_tokens)
    return train_tokens, val_tokens, tokenizer


def build_model(cfg: PretrainConfig, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(1024, cfg.seq_len), rms_norm_eps=1e-5, tie_word_embeddings=False,
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, output_router_logits=True,
        router_aux_loss_coef=cfg.router_aux_loss_coef, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(cfg.seed)
    return MixtralForCausalLM(config)


def learning_rate(step: int, total_steps: int, time_fraction: float, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr over the token or time budget."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, max(time_fraction, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def sample_windows(tokens: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """Return (batch, seq_len + 1) windows starting at random offsets of ``tokens``."""
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    return torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))


def pretrain(cfg: PretrainConfig) -> Path:
    """Tokenize, train the Mixtral for the token budget, and save it; returns the output folder."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(cfg: PretrainConfig) -> Path:
    out = Path(cfg.out_dir)
    (out / "tokens").mkdir(parents=True, exist_ok=True)
    corpus = Path(cfg.corpus)
    if not corpus.is_dir():
        raise FileNotFoundError(f"corpus folder not found: {corpus}")
    train_paths, val_paths = split_novels(corpus, cfg.val_novels, cfg.seed)
    cfg.held_out_novels = [p.name for p in val_paths]

    train_tokens, val_tokens, tokenizer = prepare_tokens(cfg, out, train_paths, val_paths)

    model = build_model(cfg, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total_steps = max(1, cfg.token_budget // tokens_per_step)
    rng = np.random.default_rng(cfg.seed)
    curve = []
    start = time.perf_counter()
    model.train()
    progress = tqdm(range(total_steps), desc="pretrain", unit="step")
    step = 0
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, (time.perf_counter() - start) / (cfg.max_minutes * 60), cfg)
        window = sample_windows(train_tokens, cfg.batch_size, cfg.seq_len, rng)
        output = model(input_ids=window[:, :-1], labels=window[:, :-1].clone())
        # HF shifts labels itself, so passing input_ids as labels trains next-token prediction;
        # window[:, -1] is then unused, which costs one token in seq_len + 1.
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ce = float(output.loss.detach()) - cfg.router_aux_loss_coef * float(output.aux_loss.detach())
        curve.append({"step": step, "ce": round(ce, 4), "aux": round(float(output.aux_loss.detach()), 4),
                      "grad_norm": round(float(grad_norm), 3)})
        progress.set_postfix(ce=f"{ce:.3f}", lr=f"{group['lr']:.2e}")
        if time.perf_counter() - start > cfg.max_minutes * 60:
            break
    seconds = time.perf_counter() - start

    model.save_pretrained(out)
    record = {"config": asdict(cfg), "steps": step + 1, "tokens_seen": (step + 1) * tokens_per_step,
              "train_seconds": round(seconds, 1), "train_tokens_available": int(len(train_tokens)),
              "val_tokens": int(len(val_tokens)), "num_params": sum(p.numel() for p in model.parameters()),
              "curve": curve}
    atomic_write_text(out / "pretrain.json", json.dumps(record, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Pre-train a small MixtralForCausalLM on a folder of novels.")
    defaults = PretrainConfig()
    for name, value in asdict(defaults).items():
        if isinstance(value, list):
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    out = pretrain(PretrainConfig(**vars(args)))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
