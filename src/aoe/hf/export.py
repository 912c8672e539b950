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
import tempfile
from pathlib import Path

from transformers import GenerationConfig

from aoe.config_utils import to_dict
from aoe.hf.convert import to_hf_model
from aoe.hf.run_dir import load_run_model, run_tokenizer_path
from aoe.model.decoder import Transformer
from aoe.train.checkpoint import apply_default_permissions

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


EXPORT_MARKER = "aoe_export.json"


def check_output_dir(out_dir: str | Path, overwrite: bool = False, run_dir: str | Path | None = None) -> Path:
    """Raise ValueError unless ``out_dir`` may receive an export; return it resolved.

    The output may be a new path, an empty folder, or (with ``overwrite``) an earlier export,
    recognised by its aoe_export.json. It may not be a file, and it may not be, contain or lie
    inside ``run_dir``, because replacing it would delete the run's checkpoints.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out_dir} exists and is not a folder; give a new folder path")
    if run_dir is not None:
        run = Path(run_dir).expanduser().resolve()
        relation = ("is" if out == run else "lies inside" if run in out.parents
                    else "contains" if out in run.parents else None)
        if relation is not None:
            raise ValueError(f"output folder {out_dir} {relation} the run folder {run_dir}, and an export must not "
                             "replace the run's checkpoints; choose a folder outside the run")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"output folder {out_dir} exists and is not empty; pass --overwrite to replace an earlier export")
        if not (out / EXPORT_MARKER).is_file():
            raise ValueError(f"output folder {out_dir} is not empty and contains no {EXPORT_MARKER}, so it is not an "
                             "earlier aoe export and --overwrite does not replace it; choose a new or empty folder")
    return out


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so the rename never publishes unwritten data."""
    from aoe.train.checkpoint import _fsync_dir

    # The read-only open and fsync of _fsync_dir works on regular files as well as folders.
    for path in [*root.rglob("*"), root]:
        _fsync_dir(path)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the complete folder ``tmp`` to ``out``; an existing ``out`` is deleted only after that succeeds."""
    if not out.exists():
        os.rename(tmp, out)
        return
    # Two renames instead of one, because rename() cannot replace a non-empty folder.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old / out.name, out)
        old.rmdir()
        raise
    shutil.rmtree(old)


def export_model(model: Transformer, out_dir: str | Path, tokenizer=None, overwrite: bool = False,
                 provenance: dict | None = None, run_dir: str | Path | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``, a HF tokenizer, if given) as a HF folder; returns its path.

    The folder is written next to ``out_dir`` under a temporary name and renamed into place, so
    a failed export leaves neither a half-written folder nor a deleted earlier export. See
    ``check_output_dir`` for which output folders are accepted (``run_dir`` is protected).
    """
    out_dir = Path(out_dir)
    out = check_output_dir(out_dir, overwrite, run_dir)
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
                                                  pad_token_id=pad if pad is not None else eos)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ValueError(f"cannot write the export to {out_dir}: {exc.strerror or exc}") from exc
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(HF_DIR / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        info = {"native_model_config": to_dict(model.config), **(provenance or {})}
        (tmp / EXPORT_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        apply_default_permissions(tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder written by `aoe train`")
    parser.add_argument("out_dir", help="folder to write the Hugging Face model into")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: newest good one)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder, tokenizer.json or SentencePiece .model "
                             "(default: the tokenizer folder of the run's data.path)")
    parser.add_argument("--no-tokenizer", action="store_true", help="export the model without tokenizer files")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export (a folder with aoe_export.json)")


def run(args: argparse.Namespace) -> int:
    # Checked before the model loads, so a wrong output path fails at once.
    check_output_dir(args.out_dir, args.overwrite, args.run_dir)
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
                       provenance={"run_dir": str(Path(args.run_dir).resolve()), "step": args.step},
                       run_dir=args.run_dir)
    print(f"exported {args.run_dir} -> {out}")
    return 0
