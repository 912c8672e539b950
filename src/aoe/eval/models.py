"""Build a ``ScoringLM`` from a run folder, an exported Hugging Face folder or a Hugging Face model path."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aoe.eval.lm import ScoringLM, hf_tokenizer_spec, text_tokenizer_spec


@dataclass
class LoadedModel:
    lm: ScoringLM
    kind: str  # "run" or "hf"
    info: dict = field(default_factory=dict)


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(spec: str) -> str:
    """Raise ValueError unless ``spec`` names a cpu, cuda[:N] or mps device that this torch can use; return it."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid --device {spec!r}: expected one of {', '.join(DEVICE_TYPES)} (cuda:N for GPU N)") from exc
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"invalid --device {spec!r}: expected one of {', '.join(DEVICE_TYPES)} (cuda:N for GPU N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"invalid --device {spec!r}: no CUDA GPU is available (torch {torch.__version__}, {build}); "
                             "use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"invalid --device {spec!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"invalid --device {spec!r}: MPS is not available on this machine; use --device cpu")
    return spec


def is_run_dir(path: str | Path) -> bool:
    """Return whether ``path`` looks written by ``aoe train``: a config.json with a "model" key.

    A run without checkpoints/ still counts, so that loading it reports the missing checkpoint.
    """
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def load_run_lm(run_dir: str | Path, tokenizer: str | None = None, step: int | None = None, batch_size: int = 8,
                add_bos: bool = True, device: str = "cpu") -> LoadedModel:
    from aoe.data.tokenizer import load_tokenizer
    from aoe.hf.run_dir import load_run_model, run_tokenizer_path

    model, config = load_run_model(run_dir, step=step)
    model = model.to(device)
    spec = tokenizer or run_tokenizer_path(run_dir, config)
    if spec is None:
        raise FileNotFoundError(f"no tokenizer folder under data.path of {run_dir}; pass --tokenizer PATH")
    text_tokenizer = load_tokenizer(str(spec))

    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(ids, attention_mask=mask).logits

    lm = ScoringLM(logits_fn, text_tokenizer_spec(text_tokenizer), max_length=model.config.max_seq_len,
                   batch_size=batch_size, add_bos=add_bos, device=device)
    return LoadedModel(lm, "run", {"run_dir": str(run_dir), "tokenizer": str(spec), "step": step,
                                   "ffn": model.config.ffn.kind})


def load_hf_lm(name_or_path: str, tokenizer: str | None = None, batch_size: int = 8, add_bos: bool = True,
               device: str = "cpu", max_length: int | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{name_or_path} is neither a run folder nor a Hugging Face model folder: it has no config.json")
    if not path.exists() and name_or_path.startswith(("/", ".", "~")):
        raise ValueError(f"model path {name_or_path} not found; give a run folder, an exported folder or a hub model name")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=True, dtype=torch.float32)
    except OSError as exc:
        # transformers raises OSError both for a missing local folder and for an unreachable hub name.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load model {name_or_path!r}: it is not a local run or model folder, and loading it "
                         f"as a Hugging Face hub name failed ({first_line})") from exc
    model = model.to(device).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer or name_or_path, trust_remote_code=True)
    if max_length is None:
        config = model.config
        max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048

    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    lm = ScoringLM(logits_fn, hf_tokenizer_spec(hf_tokenizer), max_length=max_length, batch_size=batch_size,
                   add_bos=add_bos and hf_tokenizer.bos_token_id is not None, device=device)
    return LoadedModel(lm, "hf", {"model": name_or_path, "tokenizer": tokenizer or name_or_path})


def load_lm(spec: str, tokenizer: str | None = None, step: int | None = None, batch_size: int = 8,
            add_bos: bool = True, device: str = "cpu") -> LoadedModel:
    """Load ``spec`` as a run folder when it is one, otherwise as a Hugging Face model folder or name."""
    if is_run_dir(spec):
        return load_run_lm(spec, tokenizer, step, batch_size, add_bos, device)
    if step is not None:
        raise ValueError(f"--step applies to run folders only, and {spec} is not one")
    return load_hf_lm(spec, tokenizer, batch_size, add_bos, device)
