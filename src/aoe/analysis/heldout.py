"""Held-out perplexity for the router-free study and the MoE -> AoE conversion.

Works on both kinds of model the analysis commands take: a Hugging Face causal LM folder (read
with ``AutoModelForCausalLM``) and an aoe model folder (``config.json`` with a "model" key, plus
``model.safetensors`` or a run's checkpoints). Held-out text comes as a token file (``.npy``), a
text file, or a folder of ``.txt`` files, and is cut into disjoint windows of seq_len + 1 tokens.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


def is_aoe_folder(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "model" in json.loads(config.read_text())


def load_aoe_folder(path: str | Path) -> nn.Module:
    """Load an aoe model folder: ``model.safetensors`` beside config.json, else the run's newest checkpoint."""
    from safetensors.torch import load_file

    from aoe.config_utils import from_dict
    from aoe.model.config import ModelConfig
    from aoe.model.decoder import Transformer

    path = Path(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        from aoe.train.checkpoint import load_model

        return load_model(path)[0]
    model = Transformer(from_dict(ModelConfig, json.loads((path / "config.json").read_text())["model"]))
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def load_tokenizer_for(path: Path):
    """Load the tokenizer stored with a model folder (in the folder itself or in ``tokenizer/``); None if there is none."""
    from transformers import AutoTokenizer

    for candidate in (path / "tokenizer", path):
        if (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer.model").is_file():
            return AutoTokenizer.from_pretrained(str(candidate))
    return None


def load_causal_lm(path: str | Path) -> tuple[nn.Module, object]:
    """Load (model in eval mode, tokenizer or None) from an aoe or a Hugging Face model folder."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder not found or without config.json: {path}")
    if is_aoe_folder(path):
        return load_aoe_folder(path), load_tokenizer_for(path)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval(), load_tokenizer_for(path)


def read_text_documents(path: Path) -> list[str]:
    """Read one document per file. Novels are UTF-8 with a BOM and CRLF line endings, and both are removed."""
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no .txt files in {path}")
    return [f.read_text(encoding="utf-8-sig").replace("\r\n", "\n") for f in files]


def held_out_tokens(source: str | Path, tokenizer, max_tokens: int) -> np.ndarray:
    """Token ids of ``source`` (a .npy token file, a text file or a folder of .txt files), at most max_tokens."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"held-out corpus not found: {source}")
    if source.suffix == ".npy":
        return np.load(source)[:max_tokens]
    if tokenizer is None:
        raise ValueError(f"corpus {source} is text, but the model folder has no tokenizer; pass a .npy token file")
    ids: list[int] = []
    for text in read_text_documents(source):
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # Encoding whole novels at once is slow, so text is encoded in paragraph-sized pieces.
        for i, chunk in enumerate(text.split("\n\n")):
            ids.extend((bos if i == 0 else []) + tokenizer.encode(chunk + "\n\n", add_special_tokens=False))
            if len(ids) >= max_tokens:
                return np.asarray(ids[:max_tokens], dtype=np.int64)
        ids.extend(eos)
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def token_windows(tokens: np.ndarray, seq_len: int) -> Tensor:
    """Cut ``tokens`` into disjoint (N, seq_len + 1) windows; the remainder is dropped."""
    count = len(tokens) // (seq_len + 1)
    if count == 0:
        raise ValueError(f"held-out text has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    return torch.from_numpy(np.asarray(tokens[: count * (seq_len + 1)], dtype=np.int64)).view(count, seq_len + 1)


def model_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    from aoe.model.decoder import Transformer

    if isinstance(model, Transformer):
        return model(input_ids).logits
    # Router logits are not recorded: a patched block never calls the router.
    return model(input_ids=input_ids, output_router_logits=False, use_cache=False).logits


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 8) -> dict[str, float]:
    """Return {"loss", "ppl", "tokens", "seconds"}: mean next-token cross-entropy over all windows."""
    ce_sum, count = 0.0, 0
    start = time.perf_counter()
    for batch in windows.split(batch_size):
        logits = model_logits(model, batch[:, :-1]).float()
        ce_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    loss = ce_sum / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": float(count), "seconds": time.perf_counter() - start}
