"""``aoe presets``: list the run presets with their parameter counts and training FLOPs per token."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object per preset instead of a table")


def preset_rows() -> list[dict]:
    from aoe.train.presets import RUN_PRESETS

    rows = []
    for name, build in RUN_PRESETS.items():
        config = build()
        model = config.model
        rows.append({
            "name": name,
            "kind": model.ffn.kind,
            "total_params": model.num_params(),
            "active_params": model.num_active_params(),
            "train_flops_per_token": model.train_flops_per_token(config.data.seq_len),
            "seq_len": config.data.seq_len,
            "tokens_per_step": config.data.tokens_per_step,
            "max_steps": config.schedule.max_steps,
        })
    return rows


def run(args: argparse.Namespace) -> int:
    import json

    rows = preset_rows()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = f"{'preset':<24} {'kind':<6} {'total':>10} {'active':>10} {'train FLOPs/token':>18} {'tokens/step':>12} {'steps':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['name']:<24} {row['kind']:<6} {row['total_params'] / 1e6:>9.1f}M {row['active_params'] / 1e6:>9.1f}M "
              f"{row['train_flops_per_token']:>18.3e} {row['tokens_per_step']:>12,} {row['max_steps']:>7,}")
    print()
    print(ACTIVE_NOTE)
    return 0


# The active count follows the paper's convention; without this line a tied model (tiny-dense)
# reads as having more active than total parameters.
ACTIVE_NOTE = ("active: parameters used per token, counting the embedding and the output head separately "
               "(the paper's convention),\nso a model with tied embeddings (tiny-dense) shows more active "
               "than total parameters; total counts a tied matrix once.")
