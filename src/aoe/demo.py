"""``aoe demo``: the main job, end to end on one machine.

1. Prepare a corpus into token shards (by default this interpreter's standard-library .py
   files with a byte-level BPE trained on them, so nothing is downloaded).
2. Train a router MoE + L_aux and a parameter-matched AoE + L_aux with the same seed, data
   order and token budget.
3. Evaluate held-out loss and perplexity on the validation documents.
4. Write OUT/report.md with a comparison table, per-layer Ent_load and Ent_conf, and a PNG
   with both loss curves, and print the table.

Rerunning the command reuses the prepared data and finished runs, and resumes an interrupted
run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aoe.model.config import AttentionConfig, FFNConfig, ModelConfig, matched_d_wide
from aoe.train.config import CheckpointConfig, DataConfig, OptimConfig, RunConfig, ScheduleConfig, TrainConfig

DEMO_D_MODEL = 256
DEMO_D_LOW = 86  # about d_model / 3, the best ratio in the AoE paper (Lv et al., 2025)


def demo_model(kind: str, vocab_size: int) -> ModelConfig:
    """Return the demo model: 4 layers, d_model 256, 8 experts top-2, MoE experts 512 wide.

    The AoE expert width d_wide is chosen so that an AoE expert has as many parameters as a MoE expert.
    """
    ffn = FFNConfig(kind=kind, d_ffn=512, n_experts=8, top_k=2, d_low=DEMO_D_LOW if kind == "aoe" else None,
                    aux_loss_coef=0.01)
    return ModelConfig(vocab_size=vocab_size, d_model=DEMO_D_MODEL, n_layers=4, max_seq_len=256,
                       attention=AttentionConfig(n_heads=4), ffn=ffn, tie_embeddings=True)


def demo_run(kind: str, data_path: Path, vocab_size: int, out_dir: Path, steps: int, seed: int) -> RunConfig:
    """Return the recipe both models share: 16 sequences of 128 tokens per step, AdamW, warm-up then cosine decay."""
    return RunConfig(
        name=f"demo-{kind}",
        model=demo_model(kind, vocab_size),
        data=DataConfig(path=str(data_path), seq_len=128, micro_batch_size=16, grad_accum_steps=1, seed=seed),
        optim=OptimConfig(lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleConfig(warmup_steps=max(1, steps // 10), max_steps=steps, min_lr=2e-4),
        train=TrainConfig(precision="fp32", device="cpu", log_interval=max(1, steps // 20),
                          eval_interval=max(1, steps // 4), eval_batches=16, seed=seed,
                          out_dir=str(out_dir), run_name=kind),
        checkpoint=CheckpointConfig(interval=max(1, steps // 4), keep_last=2),
    )


def prepare_demo_data(out_dir: Path, corpus: str | None, dataset: str | None, tokenizer: str | None,
                      bpe_vocab_size: int, max_bytes: int | None) -> Path:
    """Prepare the corpus once into OUT/data; reuse it when the source and options are unchanged."""
    from aoe.data.prepare import STDLIB_EXCLUDED_DIRS, default_corpus_dir, prepare_corpus

    data_dir = out_dir / "data"
    request = {"corpus": corpus, "dataset": dataset, "tokenizer": tokenizer,
               "bpe_vocab_size": None if tokenizer else bpe_vocab_size, "max_bytes": max_bytes}
    request_path = data_dir / "demo_request.json"
    if (data_dir / "meta.json").is_file() and request_path.is_file():
        if json.loads(request_path.read_text()) == request:
            print(f"reusing prepared data in {data_dir}")
            return data_dir

    options: dict[str, Any] = {"max_bytes": max_bytes, "overwrite": True}
    if tokenizer:
        options["tokenizer"] = tokenizer
    else:
        options["bpe_vocab_size"] = bpe_vocab_size
    if dataset:
        prepare_corpus(data_dir, dataset=dataset, **options)
    elif corpus:
        prepare_corpus(data_dir, input_path=corpus, **options)
    else:
        print(f"corpus: the Python standard library sources in {default_corpus_dir()}")
        prepare_corpus(data_dir, input_path=default_corpus_dir(), extensions=(".py",),
                       exclude_dirs=STDLIB_EXCLUDED_DIRS, **options)
    request_path.write_text(json.dumps(request))
    return data_dir


def discard_stale_run(config: RunConfig) -> None:
    """Delete a demo run folder left by different options or data, so the run starts fresh instead of failing."""
    run_dir = config.run_dir
    stored = run_dir / "config.json"
    if not stored.is_file():
        return
    current = json.loads(json.dumps(config.to_dict()))
    data_dir = Path(config.data.path)
    stale = json.loads(stored.read_text()) != current
    if not stale and (run_dir / "summary.json").is_file():
        stale = (data_dir / "meta.json").stat().st_mtime > (run_dir / "config.json").stat().st_mtime
    if stale:
        print(f"{run_dir} holds a demo run with other options or data; starting it again")
        shutil.rmtree(run_dir)


def _training_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    from aoe.train.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if r.get("kind") == "train" and r.get("loss") is not None]
    return [r["step"] for r in records], [r["ce_loss"] for r in records]


def _validation_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    from aoe.train.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if r.get("kind") == "val"]
    return [r["step"] for r in records], [r["val_loss"] for r in records]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}"


def comparison_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    names = list(summaries)
    rows = [
        ("total parameters", lambda s: _fmt(s["total_params"])),
        ("active parameters", lambda s: _fmt(s["active_params"])),
        ("tokens seen", lambda s: _fmt(s["tokens_seen"])),
        ("wall time (s)", lambda s: _fmt(s["wall_time_s"], 1)),
        ("tokens/s", lambda s: _fmt(s["tokens_per_s"], 0)),
        ("MFU", lambda s: "n/a" if s.get("mfu") is None else f"{100 * s['mfu']:.1f}%"),
        ("final train loss", lambda s: _fmt(s["final_train_loss"])),
        ("validation loss", lambda s: _fmt(s["val_loss"])),
        ("validation perplexity", lambda s: _fmt(s["val_ppl"], 2)),
        ("mean Ent_load over layers", lambda s: _fmt(sum(s["ent_load"]) / len(s["ent_load"]))),
        ("mean Ent_conf over layers", lambda s: _fmt(sum(s["ent_conf"]) / len(s["ent_conf"]))),
    ]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, value in rows:
        lines.append(f"| {label} | " + " | ".join(value(summaries[n]) for n in names) + " |")
    return lines


def layer_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    names = list(summaries)
    header = "| layer | " + " | ".join(f"{n} Ent_load | {n} Ent_conf" for n in names) + " |"
    lines = [header, "|---|" + "---|---|" * len(names)]
    num_layers = max(len(s["ent_load"]) for s in summaries.values())
    for layer in range(num_layers):
        cells = []
        for name in names:
            summary = summaries[name]
            cells += [_fmt(summary["ent_load"][layer]), _fmt(summary["ent_conf"][layer])]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines


def write_demo_report(out_dir: Path, runs: dict[str, Path], data_meta: dict[str, Any], config: RunConfig,
                      seconds: float) -> tuple[Path, list[str]]:
    """Write OUT/report.md and OUT/loss_curves.png; return the report path and the main table."""
    from aoe.analysis.plots import plot_loss_curves
    from aoe.train.checkpoint import atomic_write_text

    summaries = {name: json.loads((run_dir / "summary.json").read_text()) for name, run_dir in runs.items()}
    train_title = "training loss (moving average of 10 steps)"
    plot_loss_curves(
        {train_title: {n: _training_curve(d) for n, d in runs.items()},
         "validation loss": {n: _validation_curve(d) for n, d in runs.items()}},
        out_dir / "loss_curves.png", smooth={train_title: 10}, ylabel="cross-entropy (nats/token)")

    table = comparison_table(summaries)
    moe, aoe = summaries.get("MoE"), summaries.get("AoE")
    verdict = []
    if moe and aoe and moe["val_loss"] is not None and aoe["val_loss"] is not None:
        diff = aoe["val_loss"] - moe["val_loss"]
        better = "lower" if diff < 0 else "higher"
        verdict = [f"AoE's validation loss is {abs(diff):.4f} nats/token {better} than MoE's in this single-seed run. "
                   "One seed says nothing about significance; `aoe sweep` runs several seeds.", ""]
    lines = [
        "# aoe demo: router MoE vs Autonomy-of-Experts",
        "",
        f"Corpus: {', '.join(data_meta['sources'])}; tokenizer {data_meta['tokenizer']}; "
        f"{data_meta['num_tokens']['train']:,} training tokens in {data_meta['num_documents']['train']} documents, "
        f"{data_meta['num_tokens']['val']:,} validation tokens in {data_meta['num_documents']['val']} held-out documents.",
        "",
        f"Recipe (both models): {config.schedule.max_steps} steps of {config.data.micro_batch_size} x "
        f"{config.data.seq_len} tokens, AdamW lr {config.optim.lr:g} (betas {config.optim.betas}, weight decay "
        f"{config.optim.weight_decay}), {config.schedule.warmup_steps} warm-up steps then cosine to "
        f"{config.schedule.min_lr:g}, clipping {config.optim.grad_clip}, L_aux coefficient "
        f"{config.model.ffn.aux_loss_coef}, seed {config.train.seed} (same initialisation seed and data order), "
        f"{config.train.precision}. The models: {config.model.n_layers} layers, d_model {config.model.d_model}, "
        f"{config.model.ffn.n_experts} experts, top-{config.model.ffn.top_k}; MoE expert width "
        f"{config.model.ffn.d_ffn}; AoE d_low {DEMO_D_LOW} and d_wide "
        f"{matched_d_wide(DEMO_D_MODEL, config.model.ffn.d_ffn, DEMO_D_LOW)} (parameter-matched, nearest integer).",
        "",
        *table,
        "",
        *verdict,
        "![loss curves](loss_curves.png)",
        "",
        "## Routing entropy per layer (training tokens)",
        "",
        "Ent_load is the entropy of the expert load distribution (max ln 8 = 2.079); Ent_conf is the "
        "mean entropy of each token's softmax over all expert scores (lower = more confident).",
        "",
        *layer_table(summaries),
        "",
        f"Run folders: {', '.join(str(d) for d in runs.values())} (config.json, metrics.jsonl, tb/, "
        f"report.md, checkpoints). This invocation of `aoe demo` took {seconds:.0f} s; a run reused from an "
        "earlier invocation keeps its own wall time in the table.",
        "",
    ]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path, table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--corpus", help="folder or file of .txt/.jsonl/.jsonl.gz text (default: this Python's stdlib sources)")
    source.add_argument("--dataset", help="a Hugging Face dataset name or a saved dataset folder")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--tokenizer", help="use this tokenizer instead of training a BPE (SentencePiece .model, tokenizer folder, or hub name)")
    parser.add_argument("--bpe-vocab-size", type=int, default=8192, help="vocabulary of the BPE trained on the corpus (default 8192)")
    parser.add_argument("--max-bytes", type=int, default=16_000_000,
                        help="read at most this many bytes of text (default 16 MB, more than the training budget uses)")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per model (default 120)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from aoe.data.prepare import read_meta
    from aoe.train.trainer import train

    if args.steps < 1:
        raise ValueError(f"invalid --steps {args.steps}: expected a positive integer")
    started = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_demo_data(out_dir, args.corpus, args.dataset, args.tokenizer, args.bpe_vocab_size, args.max_bytes)
    meta = read_meta(data_dir)

    runs: dict[str, Path] = {}
    config = None
    for label, kind in (("MoE", "moe"), ("AoE", "aoe")):
        config = demo_run(kind, data_dir, meta["vocab_size"], out_dir, args.steps, args.seed)
        discard_stale_run(config)
        print(f"\n== {label} + L_aux: {config.model.num_params():,} total / {config.model.num_active_params():,} active parameters")
        result = train(config)
        runs[label] = Path(result.run_dir)

    report, table = write_demo_report(out_dir, runs, meta, replace(config), time.perf_counter() - started)
    print("\n" + "\n".join(table))
    print(f"\nreport: {report}")
    return 0
