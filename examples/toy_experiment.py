"""The two-stage toy experiment: where do a router MoE and an AoE layer send a class they have not seen?

Three Gaussian classes, one layer with two experts (top-1), then a linear classifier. Stage 1
trains on classes 0 and 1, stage 2 on all three. For several seeds this script measures which
expert receives the new class 2, writes the numbers to JSON and draws a figure.

    .venv/bin/python examples/toy_experiment.py --seeds 10 --out runs/toy
    .venv/bin/python examples/toy_experiment.py --seeds 2 --steps 40   # a quick look

The design and its measures are described in ``aoe.analysis.toy`` and docs/toy.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from aoe.analysis.plots import plot_toy
from aoe.analysis.toy import NEW_CLASS, ToyConfig, sample, summarize, train_toy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per layer kind (default %(default)s)")
    parser.add_argument("--steps", type=int, default=ToyConfig.steps_per_stage,
                        help="optimizer steps per stage (default %(default)s)")
    parser.add_argument("--aux-loss", type=float, default=0.0,
                        help="load-balancing loss coefficient for both layers (default %(default)s: off)")
    parser.add_argument("--out", default="runs/toy", help="folder for toy.json and the figure (default %(default)s)")
    parser.add_argument("--figure", help="figure path (default OUT/toy.png)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seeds < 1:
        raise SystemExit(f"invalid --seeds {args.seeds}: expected a positive integer")
    torch.set_num_threads(args.threads)
    config = ToyConfig(steps_per_stage=args.steps, aux_loss_coef=args.aux_loss)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = []
    first_models = {}
    for seed in range(args.seeds):
        for kind in ("moe", "aoe"):
            model, result = train_toy(kind, seed, config)
            results.append(result)
            if seed == 0:
                first_models[kind] = model
            print(f"seed {seed} {kind.upper()}: stage-1 load {fmt(result.stage1_load)} | new class -> "
                  f"{fmt(result.stage2.fractions[NEW_CLASS])} | idle expert {result.idle_expert}, new class to it: "
                  f"{result.to_idle_expert} | "
                  f"accuracy {fmt(result.stage2.accuracy)}", flush=True)

    summary = summarize(results)
    for kind, numbers in summary.items():
        print(f"{kind.upper()}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in numbers.items()))
    (out / "toy.json").write_text(json.dumps({"config": vars(config), "summary": summary,
                                              "runs": [r.to_dict() for r in results]}, indent=1))

    figure = Path(args.figure) if args.figure else out / "toy.png"
    concentration = {k: [r.concentration for r in results if r.kind == k] for k in ("moe", "aoe")}
    histories = {k: [r.new_class_history for r in results if r.kind == k] for k in ("moe", "aoe")}
    plot_toy(scatter_points(config, first_models), concentration, histories, figure)
    print(f"wrote {out / 'toy.json'} and {figure}")
    return 0


def scatter_points(config: ToyConfig, models: dict) -> dict:
    """Return (xy, class, expert) of 300 fresh points per trained model, for the scatter plot."""
    x, y = sample(config, [0, 1, 2], 300, torch.Generator().manual_seed(123))
    return {kind: (x[:, :2].tolist(), y.tolist(), model.selected_expert(x).tolist()) for kind, model in models.items()}


def fmt(values) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


if __name__ == "__main__":
    sys.exit(main())
