"""``aoe train CONFIG [overrides...]``: train from a run preset or a config file.

Running the same command again on a run folder that contains checkpoints resumes from the newest
good checkpoint, as long as the config is the same (checkpoint.resume=false rejects the folder
instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from aoe.train.checkpoint import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run preset name (see `aoe presets`) or a .yaml/.json config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. optim.lr=3e-4 model.ffn.top_k=1 data.path=data/tiny "
                             "(model.vocab_size=auto takes the vocabulary size from the data folder)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as JSON and exit without training")


def run(args: argparse.Namespace) -> int:
    from aoe.train.config import load_run_config
    from aoe.train.trainer import NonFiniteError, train

    config = load_run_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    try:
        result = train(config)
    except (NonFiniteError, CheckpointError) as exc:
        print(f"aoe train: error: {exc}", file=sys.stderr)
        return 1
    # Under torchrun only the first rank reports, like the trainer's own logging.
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {result.run_dir}")
    return 0
