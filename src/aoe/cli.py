"""The ``aoe`` command line: a thin dispatcher over one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their subcommand runs, so ``aoe --help`` stays fast. Invalid user input
(``ValueError``, including ``ConfigError``, and missing files) ends with one line on stderr
and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("aoe.data.prepare_cli", "tokenize a corpus into packed token shards"),
    "train": ("aoe.train.cli", "train a model from a preset or config file, with dotted overrides"),
    "demo": ("aoe.demo", "prepare a corpus, train MoE and AoE on it, and write a comparison report"),
    "sweep": ("aoe.analysis.sweep", "run a grid of presets x seeds and write a report"),
    "eval": ("aoe.eval.cli", "evaluate a model with lm-evaluation-harness or held-out perplexity"),
    "export": ("aoe.hf.export", "export a run to a Hugging Face model folder"),
    "routerless": ("aoe.analysis.routerless_cli", "rank a trained MoE's experts by activation norms instead of its router"),
    "convert": ("aoe.analysis.convert_cli", "convert a router MoE checkpoint into an AoE model"),
    "bench": ("aoe.bench.cli", "measure MoE and AoE throughput, memory and FLOP utilisation"),
    "presets": ("aoe.train.presets_cli", "list the run presets and their parameter counts"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aoe", description="Autonomy-of-Experts and router MoE language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; expected one of: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"aoe {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"aoe {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aoe {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
