"""``aoe convert``: turn a router MoE checkpoint into AoE models, and optionally measure them.

Writes one AoE model folder per ``--d-low`` (OUT itself for one value, OUT/dlow_<L> for several).
With ``--corpus`` it also measures held-out perplexity of the source model and of each converted
model. With ``--train-tokens`` and ``--steps`` it then continues pre-training each converted
model and measures again. ``--train-original`` trains the source MoE for the same steps, as a control. ``--report`` writes the results into a section of a markdown report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from aoe.analysis.convert import continue_pretraining, convert, load_moe_source, save_model_folder
from aoe.analysis.heldout import held_out_tokens, load_aoe_folder, load_causal_lm, perplexity, token_windows
from aoe.analysis.routerless_cli import parse_corpora, update_report_section
from aoe.model.config import SCORE_NORMS
from aoe.train.checkpoint import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="router MoE: an aoe MoE run/model folder or a Hugging Face Mixtral folder")
    parser.add_argument("--out", required=True, help="output folder (one subfolder per d_low when several are given)")
    parser.add_argument("--d-low", type=int, nargs="+", required=True, help="rank(s) of the factorised gate projection")
    parser.add_argument("--score-norm", choices=SCORE_NORMS, default="l2", help="norm AoE ranks experts by (default: l2)")
    parser.add_argument("--corpus", nargs="+", default=[], metavar="[NAME=]PATH",
                        help="held-out text for perplexity: .npy token files, text files or folders of .txt files")
    parser.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens per corpus (default: 8192)")
    parser.add_argument("--seq-len", type=int, default=128, help="window length in tokens (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch, evaluation and training (default: 8)")
    parser.add_argument("--train-tokens", default=None, help=".npy training tokens for continued pre-training")
    parser.add_argument("--steps", type=int, default=0, help="continued pre-training steps per model (default: 0, none)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of continued pre-training")
    parser.add_argument("--train-original", action="store_true",
                        help="also continue pre-training the source MoE for the same steps, as a control")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--report", default=None, help="markdown file whose conversion section is (re)written")


def run(args: argparse.Namespace) -> int:
    if args.steps < 0:
        raise ValueError(f"invalid --steps={args.steps}: expected an integer >= 0")
    if args.steps and not args.train_tokens:
        raise ValueError("--steps needs --train-tokens PATH.npy (the tokens to continue pre-training on)")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    targets = {d: out if len(args.d_low) == 1 else out / f"dlow_{d}" for d in args.d_low}
    for d_low, folder in targets.items():
        convert(args.source, folder, d_low, args.score_norm)
        print(f"wrote {folder}")
    if not args.corpus:
        return 0

    source_model, tokenizer = load_causal_lm(args.source)
    corpora = {name: token_windows(held_out_tokens(path, tokenizer, args.max_tokens), args.seq_len)
               for name, path in parse_corpora(args.corpus).items()}
    train_tokens = np.load(args.train_tokens) if args.train_tokens else None
    rows = [measure("router MoE (source)", None, source_model, corpora, args, train_tokens if args.train_original else None,
                    out / "source_continued")]
    for d_low, folder in targets.items():
        meta = json.loads((folder / "config.json").read_text())
        rows.append(measure(f"AoE d_low={d_low}", d_low, load_aoe_folder(folder), corpora, args, train_tokens,
                            folder.parent / f"{folder.name}_continued", meta["gate_relative_error"]))
    result = {"source": str(args.source), "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "lr": args.lr, "corpora": {name: int(w[:, 1:].numel()) for name, w in corpora.items()}, "rows": rows}
    atomic_write_text(out / "convert.json", json.dumps(result, indent=1))
    print(format_table(result))
    if args.report:
        update_report_section(Path(args.report), "convert", report_section(result))
        print(f"wrote {args.report}")
    return 0


def measure(label, d_low, model, corpora, args, train_tokens, continued_dir, gate_error=None) -> dict:
    row = {"label": label, "d_low": d_low, "gate_relative_error": gate_error,
           "before": {name: perplexity(model, w, args.batch_size)["ppl"] for name, w in corpora.items()}}
    if train_tokens is not None and args.steps:
        if not hasattr(model, "config") or not hasattr(model.config, "ffn"):
            # A Hugging Face source is trained through its aoe mapping, so both sides run the same code.
            config, state, _ = load_moe_source(args.source)
            from aoe.model.decoder import Transformer

            model = Transformer(config)
            model.load_state_dict(state)
        curve = continue_pretraining(model, train_tokens, args.steps, args.batch_size, args.seq_len, args.lr)
        row["after"] = {name: perplexity(model, w, args.batch_size)["ppl"] for name, w in corpora.items()}
        row["train_seconds"] = curve[-1]["seconds"]
        row["final_train_loss"] = float(np.mean([c["loss"] for c in curve[-10:]]))
        save_model_folder(continued_dir, model.config, model.state_dict(), {"continued_steps": args.steps})
    return row


def format_table(result: dict) -> str:
    corpora = list(result["corpora"])
    has_after = any("after" in row for row in result["rows"])
    header = ["model", "W_g rel. error"] + [f"ppl {c}" for c in corpora]
    if has_after:
        header += [f"ppl {c} after {result['steps']} steps" for c in corpora] + ["train seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        error = "—" if row["gate_relative_error"] is None else f"{row['gate_relative_error']:.3f}"
        cells = [row["label"], error] + [f"{row['before'][c]:.2f}" for c in corpora]
        if has_after:
            after = row.get("after")
            cells += [f"{after[c]:.2f}" if after else "—" for c in corpora]
            cells.append(f"{row['train_seconds']:.0f}" if after else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_section(result: dict) -> str:
    corpora = ", ".join(f"{name} ({tokens} tokens)" for name, tokens in result["corpora"].items())
    text = [f"Source: `{result['source']}`. Held-out perplexity on {corpora}."]
    if result["steps"]:
        text.append(f"Continued pre-training: {result['steps']} AdamW steps of {result['batch_size']} x "
                    f"{result['seq_len']} tokens, peak learning rate {result['lr']}.")
    return "\n".join([" ".join(text), "", format_table(result)])
