"""``aoe export RUN_DIR OUT_DIR``: write a run's checkpoint as a Hugging Face model folder.

The folder contains model.safetensors, config.json (with ``auto_map`` pointing at the copied
configuration_aoe.py and modeling_aoe.py), generation_config.json, the tokenizer files and
aoe_export.json (source run, step and native model config). It loads with
``AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`` without aoe installed.
Pass ``trust_remote_code=True`` to ``AutoTokenizer.from_pretrained(OUT_DIR)`` as well, because
transformers reads config.json there too and otherwise asks on stdin whether to run the code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from transformers import GenerationConfig

from aoe.config_utils import to_dict
from aoe.hf.convert import to_hf_model
from aoe.hf.run_dir import load_run_model, run_tokenizer_path
from aoe.model.decoder import Transformer

HF_DIR = Path(__file__).parent
REMOTE_CODE_FILES = ("configuration_aoe.py", "modeling_aoe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_aoe.AoEConfig",
    "AutoModel": "modeling_aoe.AoEModel",
    "AutoModelForCausalLM": "modeling_aoe.AoEForCausalLM",
}


def load_tokenizer_files(spec: str | Path):
    """Load a tokenizer (a folder of HF files, tokenizer.json or SentencePiece .model) as a fast HF tokenizer."""
    from aoe.data.tokenizer import load_tokenizer

    return load_tokenizer(str(spec)).hf


def export_model(model: Transformer, out_dir: str | Path, tokenizer=None, overwrite: bool = False,
                 provenance: dict | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``, a HF tokenizer, if given) as a HF folder; returns its path.

    The folder is written next to ``out_dir`` under a temporary name and renamed into place, so
    a failed export never leaves a half-written model folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out_dir} exists and is not empty; pass --overwrite to replace it")
    bos = eos = pad = None
    if tokenizer is not None:
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids but model.vocab_size={model.config.vocab_size}")

    hf_model = to_hf_model(model, bos, eos, pad)
    hf_model.config.auto_map = dict(AUTO_MAP)
    hf_model.config.architectures = ["AoEForCausalLM"]
    # Left-padded batched generation needs a pad id; EOS is the usual stand-in when there is none.
    hf_model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos,
                                                  pad_token_id=pad if pad is not None else eos,
                                                  max_length=model.config.max_seq_len)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    hf_model.save_pretrained(tmp, safe_serialization=True)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(HF_DIR / name, tmp / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    info = {"native_model_config": to_dict(model.config), **(provenance or {})}
    (tmp / "aoe_export.json").write_text(json.dumps(info, indent=2) + "\n")

    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder written by `aoe train`")
    parser.add_argument("out_dir", help="folder to write the Hugging Face model into")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: newest good one)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder, tokenizer.json or SentencePiece .model "
                             "(default: the tokenizer folder of the run's data.path)")
    parser.add_argument("--no-tokenizer", action="store_true", help="export the model without tokenizer files")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder")


def run(args: argparse.Namespace) -> int:
    model, config = load_run_model(args.run_dir, step=args.step)
    tokenizer = None
    if not args.no_tokenizer:
        spec = args.tokenizer or run_tokenizer_path(args.run_dir, config)
        if spec is None:
            data_path = (config.get("data") or {}).get("path")
            raise FileNotFoundError(f"no tokenizer folder under data.path={data_path!r} of {args.run_dir}; "
                                    "pass --tokenizer PATH or --no-tokenizer")
        tokenizer = load_tokenizer_files(spec)
    out = export_model(model, args.out_dir, tokenizer, overwrite=args.overwrite,
                       provenance={"run_dir": str(Path(args.run_dir).resolve()), "step": args.step})
    print(f"exported {args.run_dir} -> {out}")
    return 0
