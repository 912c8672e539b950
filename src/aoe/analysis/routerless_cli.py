"""``aoe routerless``: rank a trained MoE's experts by activation norms instead of its router.

For every (node, norm) setting the command swaps each sparse MoE block's router decision for
the norm ranking (see ``aoe.analysis.routerless``), measures held-out perplexity and, when the
evaluation bridge is installed, task accuracy, and times each setting. Two reference rows come
with every grid: the unmodified model (its router) and a uniformly random top-K choice.
Results go to a JSON file and, with ``--report``, to a section of a markdown report with a bar chart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from aoe.analysis.heldout import held_out_tokens, load_causal_lm, perplexity, token_windows
from aoe.analysis.routerless import NODE_LABELS, NODES, NORMS, routerless
from aoe.train.checkpoint import atomic_write_text

NORM_LABELS = {"l2": "L2", "l1": "L1", "linf": "L∞"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face MoE folder (Mixtral, PhiMoE, OLMoE, Qwen2-MoE, Qwen3-MoE) "
                                      "or aoe MoE run/model folder")
    parser.add_argument("--node", nargs="+", choices=NODES + ("router",), default=list(NODES),
                        help="activations whose norm ranks the experts (default: all five); 'router' ranks by the "
                             "router logits through the patched code, which must reproduce the original row")
    parser.add_argument("--norm", nargs="+", choices=NORMS, default=list(NORMS), help="norms to rank by (default: all)")
    parser.add_argument("--corpus", nargs="+", default=[], metavar="[NAME=]PATH",
                        help="held-out text for perplexity: .npy token files, text files or folders of .txt files")
    parser.add_argument("--tasks", nargs="+", default=[], help="lm-eval tasks, run through aoe's evaluation bridge")
    parser.add_argument("--task-data", default=None, help="folder with the local task files (required with --tasks)")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens per corpus (default: 8192)")
    parser.add_argument("--seq-len", type=int, default=128, help="window length in tokens (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument("--top-k", type=int, default=None, help="experts per token (default: the model's own K)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random top-K reference row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out-json", default=None, help="write the results here (default: MODEL/routerless.json)")
    parser.add_argument("--report", default=None, help="markdown file whose router-free section is (re)written")
    parser.add_argument("--section", default="routerless",
                        help="name of the report section to (re)write, so several runs can share one report")
    parser.add_argument("--figure", default=None,
                        help="bar chart PNG (default: figures/<section>.png beside --report)")


def parse_corpora(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after the file stem) -> {name: path}."""
    corpora = {}
    for spec in specs:
        name, _, path = spec.rpartition("=")
        corpora[name or Path(path).stem] = path
    return corpora


def run(args: argparse.Namespace) -> int:
    if not args.corpus and not args.tasks:
        raise ValueError("nothing to measure: pass --corpus PATH (held-out perplexity) and/or --tasks NAME")
    if args.tasks and not (args.task_data and Path(args.task_data).is_dir()):
        raise ValueError(f"invalid --task-data={args.task_data!r}: --tasks needs the folder with the local task files")
    for name in ("max_tokens", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"invalid --{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_causal_lm(args.model)
    corpora = {name: token_windows(held_out_tokens(path, tokenizer, args.max_tokens), args.seq_len)
               for name, path in parse_corpora(args.corpus).items()}
    # The router ignores the norm, so it gets one row; the two references come first and last.
    settings = [("original", None)]
    for node in args.node:
        settings += [("router", None)] if node == "router" else [(node, norm) for norm in args.norm]
    settings.append(("random", None))
    rows = run_grid(model, settings, corpora, args, tokenizer)

    result = {"model": str(args.model), "top_k": args.top_k, "seq_len": args.seq_len,
              "corpora": {name: int(w[:, 1:].numel()) for name, w in corpora.items()},
              "tasks": args.tasks, "limit": args.limit, "threads": torch.get_num_threads(), "rows": rows}
    out_json = Path(args.out_json or Path(args.model) / "routerless.json")
    atomic_write_text(out_json, json.dumps(result, indent=1))
    print(format_table(result))
    if args.report:
        figure = Path(args.figure or Path(args.report).parent / "figures" / f"{args.section}.png")
        written = [str(args.report)]
        if plot_grid(result, figure):
            written.append(str(figure))
        update_report_section(Path(args.report), args.section, report_section(result, figure, Path(args.report)))
        print(f"wrote {' and '.join(written)}")
    print(f"wrote {out_json}")
    return 0


def run_grid(model, settings, corpora, args, tokenizer) -> list[dict]:
    from tqdm import tqdm

    rows = []
    for node, norm in tqdm(settings, desc="settings", unit="setting"):
        row = {"node": node, "norm": norm, "label": NODE_LABELS.get(node, "router (original)"), "ppl": {},
               "accuracy": {}, "seconds": 0.0}
        # The original forward runs outside any patch; "random" ignores the norm.
        context = routerless(model, node, norm or "l2", args.top_k, args.seed) if node != "original" else contextlib.nullcontext()
        with context:
            for name, windows in corpora.items():
                measured = perplexity(model, windows, args.batch_size)
                row["ppl"][name] = measured["ppl"]
                row["seconds"] += measured["seconds"]
            if args.tasks:
                start = time.perf_counter()
                row["accuracy"] = task_accuracy(model, tokenizer, args)
                row["seconds"] += time.perf_counter() - start
        rows.append(row)
    return rows


def scoring_lm(model, tokenizer, batch_size: int):
    """Wrap ``model``'s current forward as an lm-eval model, so that a routerless patch applies to it."""
    from aoe.analysis.heldout import model_logits
    from aoe.eval.lm import ScoringLM, hf_tokenizer_spec

    if tokenizer is None:
        raise ValueError("--tasks needs the model's tokenizer, and the model folder has none")
    config = getattr(model, "config", None)
    max_length = getattr(config, "max_seq_len", None) or getattr(config, "max_position_embeddings", 2048)

    def logits_fn(ids, mask):
        # Right padding only: padded positions come after every scored token, so no mask is needed.
        return model_logits(model, ids)

    return ScoringLM(logits_fn, hf_tokenizer_spec(tokenizer), max_length=max_length, batch_size=batch_size,
                     add_bos=tokenizer.bos_token_id is not None)


def task_accuracy(model, tokenizer, args) -> dict[str, float]:
    """Accuracy per task with aoe's local lm-eval task configs (``aoe eval --data-dir``)."""
    import os

    from aoe.eval.cli import evaluate_task, task_manager
    from aoe.eval.suite import parse_tasks

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm = scoring_lm(model, tokenizer, args.batch_size)
    manager = task_manager(args.task_data)
    return {task: evaluate_task(lm, manager, task, True, args.limit, None, args.seed)["acc"]
            for task in parse_tasks(",".join(args.tasks))}


# ----- report ------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    corpora = list(result["corpora"])
    tasks = sorted({t for row in result["rows"] for t in row["accuracy"]})
    header = ["selection", "norm"] + [f"ppl {c}" for c in corpora] + [f"acc {t}" for t in tasks] + ["seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        cells = [row["label"], NORM_LABELS.get(row["norm"], "—")]
        cells += [f"{row['ppl'][c]:.2f}" for c in corpora]
        cells += [f"{100 * row['accuracy'][t]:.1f}" for t in tasks]
        cells.append(f"{row['seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_grid(result: dict, path: Path) -> bool:
    """Plot held-out perplexity per node, one bar per norm, with the reference rows as lines; return whether it wrote ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = list(result["corpora"])
    if not corpora:
        # A task-only run has no perplexity to plot.
        return False
    rows = result["rows"]
    nodes = [n for n in NODES if any(r["node"] == n for r in rows)]
    norms = [n for n in NORMS if any(r["norm"] == n for r in rows)]
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), squeeze=False)
    width = 0.8 / max(1, len(norms))
    for ax, corpus in zip(axes[0], corpora):
        for j, norm in enumerate(norms):
            values = [next((r["ppl"][corpus] for r in rows if r["node"] == n and r["norm"] == norm), float("nan"))
                      for n in nodes]
            ax.bar([i + (j - (len(norms) - 1) / 2) * width for i in range(len(nodes))], values, width,
                   label=NORM_LABELS[norm])
        for row, style in ((r, s) for r in rows for name, s in (("original", "k-"), ("random", "r--")) if r["node"] == name):
            ax.axhline(row["ppl"][corpus], color=style[0], linestyle=style[1:], label=row["label"])
        ax.set_xticks(range(len(nodes)), [NODE_LABELS[n] for n in nodes], rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("held-out perplexity (log scale)")
        ax.set_title(corpus)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def report_section(result: dict, figure: Path, report: Path) -> str:
    corpora = ", ".join(f"{name} ({tokens} tokens)" for name, tokens in result["corpora"].items())
    relative = figure.relative_to(report.parent) if figure.is_relative_to(report.parent) else figure
    measured = f"Held-out perplexity on {corpora}, windows of {result['seq_len']} tokens. " if corpora else ""
    lines = [
        f"Model: `{result['model']}`. {measured}"
        f"Seconds: wall-clock time of each setting's evaluation on {result['threads']} CPU thread(s) of a shared "
        "machine, so compare them with each other only.",
        "",
        format_table(result),
    ]
    if result["tasks"]:
        limit = f"at most {result['limit']} examples per task" if result["limit"] else "all examples"
        lines += ["", f"Accuracy in percent on {', '.join(result['tasks'])} ({limit}, aoe's local task files)."]
    if result["corpora"]:
        lines += ["", f"![router-free perplexity]({relative})"]
    return "\n".join(lines)


def update_report_section(path: Path, name: str, body: str) -> None:
    """Replace the text between the ``<!-- name:begin -->`` and ``<!-- name:end -->`` markers (append if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
