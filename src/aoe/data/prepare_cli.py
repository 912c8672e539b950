"""``aoe prepare``: tokenize a corpus into packed token shards (see aoe.data.prepare)."""

from __future__ import annotations

import argparse

from aoe.data.prepare import DEFAULT_EXTENSIONS, STDLIB_EXCLUDED_DIRS, default_corpus_dir, prepare_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a text file, a .jsonl(.gz) file, or a folder searched recursively")
    source.add_argument("--dataset", help="a Hugging Face dataset name, or a folder written by Dataset.save_to_disk")
    source.add_argument("--stdlib", action="store_true", help="use this Python's standard-library .py files (no download)")
    parser.add_argument("--dataset-config", default=None, help="dataset configuration name (with --dataset)")
    parser.add_argument("--split", default="train", help="dataset split to read (with --dataset; default train)")
    parser.add_argument("--text-field", default="text", help="JSON or dataset field that contains the text (default text)")
    parser.add_argument(
        "--extensions", nargs="+", default=None,
        help=f"file name endings to read from a folder (default {' '.join(DEFAULT_EXTENSIONS)}; .py with --stdlib)",
    )
    vocab = parser.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--tokenizer", help="SentencePiece .model, tokenizer.json, tokenizer folder, or hub name")
    vocab.add_argument("--bpe-vocab-size", type=int, help="train a byte-level BPE of this vocabulary size on the training split")
    parser.add_argument("--out", required=True, help="output folder for shards, meta.json and tokenizer/")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of DOCUMENTS held out for validation (default 0.05, at least one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val document split (default 0)")
    parser.add_argument("--max-documents", type=int, default=None, help="keep at most this many documents (in sorted file order)")
    parser.add_argument("--max-bytes", type=int, default=None, help="keep documents until their UTF-8 size would exceed this many bytes")
    parser.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto", help="token dtype of the shards (auto: uint16 when the vocabulary fits)")
    parser.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")


def run(args: argparse.Namespace) -> int:
    input_path, exclude, extensions = args.input, (), args.extensions or DEFAULT_EXTENSIONS
    if args.stdlib:
        input_path, exclude, extensions = default_corpus_dir(), STDLIB_EXCLUDED_DIRS, args.extensions or (".py",)
    meta = prepare_corpus(
        args.out,
        input_path=input_path,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        split=args.split,
        text_field=args.text_field,
        tokenizer=args.tokenizer,
        bpe_vocab_size=args.bpe_vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_documents=args.max_documents,
        max_bytes=args.max_bytes,
        extensions=tuple(extensions),
        exclude_dirs=exclude,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    tokens, docs = meta["num_tokens"], meta["num_documents"]
    print(
        f"wrote {args.out}: train {tokens['train']:,} tokens / {docs['train']} documents, "
        f"val {tokens['val']:,} tokens / {docs['val']} documents, vocab {meta['vocab_size']} ({meta['dtype']}), "
        f"{meta['seconds']:.1f} s"
    )
    return 0
