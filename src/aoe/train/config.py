"""Run configs: one dataclass per concern (model, data, optimizer, schedule, loop, checkpoints).

Each dataclass checks its own fields in ``__post_init__``; ``RunConfig`` checks the fields that
depend on each other. Checks that read the disk (the prepared data folder, its tokenizer and its
vocabulary) live in ``check_data``, which ``train()`` calls before building the model, so that
presets can be built on a machine without the data.

Loading (``load_run_config``): a preset name, or a .yaml/.json file, then dotted overrides such as
``model.ffn.top_k=1 optim.lr=3e-4``. A file may start from a preset with a top-level
``preset: NAME`` key and override only some fields. ``model.vocab_size: auto`` (in a file or an
override) takes the vocabulary size from the data folder's meta.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aoe.config_utils import ConfigError, apply_overrides, check, check_choice, from_dict, load_config_file, to_dict
from aoe.model.config import ModelConfig
from aoe.train.distributed import ParallelConfig

PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "cuda", "auto")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class DataConfig:
    """Where the prepared token shards are and how they are cut into batches.

    One optimizer step reads micro_batch_size * grad_accum_steps sequences of seq_len tokens.
    """

    path: str = "data/tiny"
    seq_len: int = 128
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check(isinstance(self.path, str) and self.path != "", "data.path", self.path,
              "expected the path of a folder written by `aoe prepare`")
        for name in ("seq_len", "micro_batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            check(_positive_int(value), f"data.{name}", value, "expected a positive integer")
        check(isinstance(self.seed, int) and self.seed >= 0, "data.seed", self.seed, "expected an integer >= 0")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch_size * self.grad_accum_steps


@dataclass
class OptimConfig:
    """AdamW. Weight decay applies to weight matrices only (see ``aoe.train.optim``)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    # Clip the global gradient norm to this value; 0 turns clipping off (the norm is still logged).
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check(_finite(self.lr) and self.lr > 0, "optim.lr", self.lr, "expected a finite number > 0")
        betas = self.betas
        check(isinstance(betas, (list, tuple)) and len(betas) == 2 and all(0 <= b < 1 for b in betas),
              "optim.betas", betas, "expected two numbers in [0, 1), e.g. [0.9, 0.95]")
        self.betas = (float(betas[0]), float(betas[1]))
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "expected a number >= 0")
        check(self.eps > 0, "optim.eps", self.eps, "expected a number > 0")
        check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "expected a number >= 0 (0 turns clipping off)")


@dataclass
class ScheduleConfig:
    """Linear warm-up to the peak LR (optim.lr), then cosine decay to min_lr at max_steps."""

    warmup_steps: int = 50
    max_steps: int = 500
    min_lr: float = 1e-4

    def __post_init__(self) -> None:
        check(_positive_int(self.max_steps), "schedule.max_steps", self.max_steps, "expected a positive integer")
        check(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.max_steps,
              "schedule.warmup_steps", self.warmup_steps, f"expected an integer from 0 to max_steps-1={self.max_steps - 1}")
        check(self.min_lr >= 0, "schedule.min_lr", self.min_lr, "expected a number >= 0")


@dataclass
class TrainConfig:
    """The loop itself: precision, device, logging, evaluation and where the run directory goes."""

    # fp32, or bf16 autocast (parameters and optimizer state stay fp32). NOTE: CPUs without
    # native bf16 matmul run bf16 far slower than fp32, so fp32 is the default.
    precision: str = "fp32"
    device: str = "cpu"
    log_interval: int = 10
    eval_interval: int = 100
    # Validation batches per evaluation; 0 evaluates nothing.
    eval_batches: int = 20
    # Seed of the model initialisation (the data order has its own, data.seed).
    seed: int = 0
    out_dir: str = "runs"
    # Run folder name under out_dir; None uses the RunConfig name.
    run_name: str | None = None
    # torch.use_deterministic_algorithms, so that a resumed run repeats an uninterrupted one.
    deterministic: bool = True
    # torch intra-op threads; None keeps torch's default. Results are bit-identical only
    # between runs with the same thread count.
    num_threads: int | None = None
    tensorboard: bool = True
    progress: bool = True
    # Peak FLOP/s for MFU; None measures a dense matmul on this machine at the start of the run.
    peak_flops: float | None = None

    def __post_init__(self) -> None:
        check_choice("train.precision", self.precision, PRECISIONS)
        check_choice("train.device", self.device, DEVICES)
        for name in ("log_interval", "eval_interval"):
            value = getattr(self, name)
            check(_positive_int(value), f"train.{name}", value, "expected a positive integer")
        check(isinstance(self.eval_batches, int) and self.eval_batches >= 0, "train.eval_batches",
              self.eval_batches, "expected an integer >= 0 (0 turns validation off)")
        check(isinstance(self.seed, int) and self.seed >= 0, "train.seed", self.seed, "expected an integer >= 0")
        check(isinstance(self.out_dir, str) and self.out_dir != "", "train.out_dir", self.out_dir,
              "expected a folder path")
        if self.run_name is not None:
            check(isinstance(self.run_name, str) and self.run_name not in ("", ".", "..") and "/" not in self.run_name,
                  "train.run_name", self.run_name, "expected a folder name without '/'")
        if self.num_threads is not None:
            check(_positive_int(self.num_threads), "train.num_threads", self.num_threads,
                  "expected a positive integer or null")
        if self.peak_flops is not None:
            check(_finite(self.peak_flops) and self.peak_flops > 0, "train.peak_flops", self.peak_flops,
                  "expected finite FLOP/s > 0 or null")


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many stay on disk."""

    # Write a checkpoint every `interval` optimizer steps; 0 writes only the final one.
    interval: int = 100
    # Checkpoints to keep; older ones are deleted after a newer one is safely on disk.
    keep_last: int = 3
    save_final: bool = True
    # Resume from the latest good checkpoint when the run folder already contains this run.
    resume: bool = True

    def __post_init__(self) -> None:
        check(isinstance(self.interval, int) and self.interval >= 0, "checkpoint.interval", self.interval,
              "expected an integer >= 0 (0 saves only at the end)")
        check(_positive_int(self.keep_last), "checkpoint.keep_last", self.keep_last,
              "expected a positive integer (at least one checkpoint stays, to resume from)")


@dataclass
class RunConfig:
    """Everything one training run needs; RUN/config.json stores it resolved."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Multi-process training under torchrun (aoe.train.distributed); mode none is one process.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        check(isinstance(self.name, str) and self.name != "" and "/" not in self.name, "name", self.name,
              "expected a non-empty run name without '/'")
        check(self.data.seq_len <= self.model.max_seq_len, "data.seq_len", self.data.seq_len,
              f"expected at most model.max_seq_len={self.model.max_seq_len}")
        check(self.schedule.min_lr <= self.optim.lr, "schedule.min_lr", self.schedule.min_lr,
              f"expected at most the peak optim.lr={self.optim.lr}")

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out_dir) / (self.train.run_name or self.name)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return from_dict(cls, data)


# ----- checks against the prepared data ----------------------------------------------------


def read_data_meta(path: str | Path) -> dict[str, Any]:
    """Read DIR/meta.json of a prepared data folder, raising ConfigError naming data.path if absent."""
    folder = Path(path)
    check(folder.is_dir(), "data.path", str(path), "expected an existing folder written by `aoe prepare` (not found)")
    meta_path = folder / "meta.json"
    check(meta_path.is_file(), "data.path", str(path), "expected a folder with meta.json, written by `aoe prepare`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid data meta file {meta_path}: not valid JSON ({exc})") from None
    check(isinstance(meta, dict) and isinstance(meta.get("vocab_size"), int), "data meta vocab_size",
          meta.get("vocab_size") if isinstance(meta, dict) else meta, f"expected an integer in {meta_path}")
    return meta


def check_data(config: RunConfig) -> dict[str, Any]:
    """Check the data folder, its tokenizer and vocabulary against the model; return meta.json."""
    meta = read_data_meta(config.data.path)
    tokenizer_dir = Path(config.data.path) / "tokenizer"
    check(tokenizer_dir.is_dir(), "data.path", config.data.path,
          f"expected a tokenizer folder at {tokenizer_dir} (written by `aoe prepare`); it is missing")
    check(meta["vocab_size"] <= config.model.vocab_size, "model.vocab_size", config.model.vocab_size,
          f"expected at least the data's vocabulary size {meta['vocab_size']} "
          f"(set model.vocab_size={meta['vocab_size']} or model.vocab_size=auto)")
    num_tokens = meta.get("num_tokens", {})
    if isinstance(num_tokens, dict) and "train" in num_tokens:
        check(num_tokens["train"] > config.data.seq_len, "data.path", config.data.path,
              f"expected a train split longer than seq_len={config.data.seq_len} tokens "
              f"(it has {num_tokens['train']}); the corpus is empty or too small")
    return meta


# ----- loading -----------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_auto_vocab(data: dict[str, Any]) -> None:
    model = data.get("model")
    if not isinstance(model, dict) or model.get("vocab_size") != "auto":
        return
    section = data.get("data")
    path = section.get("path", DataConfig.path) if isinstance(section, dict) else DataConfig.path
    model["vocab_size"] = read_data_meta(path)["vocab_size"]


def load_run_config(spec: str, overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from a preset name or a .yaml/.json file, then apply dotted overrides."""
    from aoe.train.presets import RUN_PRESETS, run_preset

    overrides = list(overrides or [])
    if spec in RUN_PRESETS:
        data = run_preset(spec).to_dict()
    elif spec.endswith((".yaml", ".yml", ".json")) or Path(spec).exists():
        data = load_config_file(spec)
        base = data.pop("preset", None)
        if base is not None:
            data = _deep_merge(run_preset(str(base)).to_dict(), data)
    else:
        run_preset(spec)  # raises the unknown-preset error with a did-you-mean hint
        raise AssertionError("unreachable")
    data = apply_overrides(data, overrides, RunConfig)
    _resolve_auto_vocab(data)
    return RunConfig.from_dict(data)
