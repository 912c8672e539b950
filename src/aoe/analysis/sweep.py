"""``aoe sweep``: train a grid of configurations x seeds and write one comparison report.

The grid comes from ``aoe.analysis.grid`` (the AoE paper's Table 2 and Table 3 rows and a
dense baseline). Every run reads the same data in the same order (one data seed for the whole
grid); seeds change only the model initialisation. Layout of the sweep folder OUT::

    OUT/data/           the prepared corpus, when the sweep prepares it (--corpus)
    OUT/runs/NAME-seedS/ one run folder per run (config.json, metrics.jsonl, summary.json, ...)
    OUT/report.md       the report, with its figures in OUT/figures/ (or --report, --figures-dir)

A run whose folder already contains a finished run (summary.json with every step of the same
config) is skipped, so a grid can be completed over several sittings: start the same command
again. Several sweeps may work on one OUT at the same time (start the same command in
several shells): a sweep that trains a run holds the lock file RUN/sweep.lock, and the
others skip that run. The report covers every finished run in OUT/runs, including runs of
earlier sittings and of other sweeps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aoe.analysis import grid as grid_lib
from aoe.analysis.grid import GRID, grid_entry, grid_run

RUN_NAME_PATTERN = re.compile(r"^(?P<name>.+)-seed(?P<seed>\d+)$")
# Config fields that may differ between a finished run and the sweep's config without making
# that run a different experiment (they change logging and bookkeeping only).
IGNORED_CONFIG_KEYS = {"train.log_interval", "train.progress", "train.tensorboard", "checkpoint.keep_last",
                       "checkpoint.interval", "checkpoint.resume", "checkpoint.save_final", "train.peak_flops",
                       "train.out_dir"}


# ----- command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="sweep folder: runs go to OUT/runs, the report to OUT/report.md")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="prepared data folder (written by `aoe prepare`) shared by every run")
    source.add_argument("--corpus", help="text corpus (file or folder) to prepare once into OUT/data")
    parser.add_argument("--tokenizer", help="tokenizer for --corpus: a SentencePiece .model, tokenizer.json or "
                                            "tokenizer folder (default: train a byte-level BPE, see --bpe-vocab)")
    parser.add_argument("--bpe-vocab", type=int, default=grid_lib.CPU_VOCAB_SIZE,
                        help="vocabulary size of the BPE trained on --corpus when no --tokenizer is given "
                             "(default %(default)s)")
    parser.add_argument("--configs", default="all",
                        help="comma-separated grid configurations, or 'all' (default); see --list")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per configuration (default: 3 for moe-laux and aoe-dlow256-laux, 1 otherwise)")
    parser.add_argument("--scale", choices=grid_lib.SCALES, default="cpu",
                        help="model and recipe scale (default %(default)s; 'paper' is the 732M model)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override applied to every run config, e.g. schedule.max_steps=100 (repeatable)")
    parser.add_argument("--report", help="markdown report path (default OUT/report.md)")
    parser.add_argument("--figures-dir", help="folder for the report's PNG files (default: figures/ next to the report)")
    parser.add_argument("--figure-prefix", default="sweep", help="file-name prefix of the PNG files (default %(default)s)")
    parser.add_argument("--title", default="MoE and AoE comparison grid", help="report title")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs; train nothing")
    parser.add_argument("--list", action="store_true", help="print the planned runs and whether each is finished, then exit")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    plan = plan_grid(args.configs, args.seeds)
    report_path = Path(args.report) if args.report else out / "report.md"
    figures_dir = Path(args.figures_dir) if args.figures_dir else report_path.parent / "figures"

    if args.report_only:
        write_sweep_report(out, report_path, figures_dir, args.figure_prefix, args.title)
        print(f"report: {report_path}")
        return 0

    data_path = resolve_data(out, args.data, args.corpus, args.tokenizer, args.bpe_vocab, create=not args.list)
    configs = build_run_configs(plan, args.scale, data_path, out / "runs", args.overrides)
    if args.list:
        for config in configs:
            print(f"{config.name:40s} {'finished' if finished_run(config) else 'to run'}")
        return 0

    failures = run_grid(configs)
    write_sweep_report(out, report_path, figures_dir, args.figure_prefix, args.title)
    print(f"report: {report_path}")
    if failures:
        print(f"aoe sweep: {len(failures)} run(s) failed: " + "; ".join(f"{n}: {e}" for n, e in failures),
              file=sys.stderr)
        return 1
    return 0


# ----- planning ----------------------------------------------------------------------------


def plan_grid(configs: str, seeds: int | None = None) -> list[tuple[str, int]]:
    """Return (configuration, seed) pairs, headline pair first, so that a cut-short sweep has them.

    ``configs`` is 'all' or a comma-separated list of grid names; ``seeds`` replaces the
    default seed count of every configuration.
    """
    names = list(GRID) if configs.strip() == "all" else [n.strip() for n in configs.split(",") if n.strip()]
    if not names:
        raise ValueError(f"invalid --configs {configs!r}: expected 'all' or comma-separated names from {', '.join(GRID)}")
    for name in names:
        grid_entry(name)
    if seeds is not None and seeds < 1:
        raise ValueError(f"invalid --seeds {seeds}: expected a positive integer")
    counts = {name: seeds if seeds is not None else grid_lib.default_seeds(name) for name in dict.fromkeys(names)}

    headline = [n for n in (grid_lib.HEADLINE_MOE, grid_lib.HEADLINE_AOE) if n in counts]
    first = [(n, 0) for n in headline]
    rest_of_headline = [(n, s) for s in range(1, max((counts[n] for n in headline), default=0)) for n in headline
                        if s < counts[n]]
    others = [(n, s) for n in counts if n not in headline for s in range(counts[n])]
    return first + rest_of_headline + others


def resolve_data(out: Path, data: str | None, corpus: str | None, tokenizer: str | None, bpe_vocab: int,
                 create: bool = True) -> str:
    """Return the prepared data folder: ``data``, or OUT/data prepared once from ``corpus``."""
    if data is not None:
        if not (Path(data) / "meta.json").is_file():
            raise FileNotFoundError(f"prepared data folder not found: {data}/meta.json is missing (run `aoe prepare` first)")
        return data
    if corpus is None:
        raise ValueError("missing data: give --data DIR (a prepared folder) or --corpus PATH (text to prepare)")
    target = out / "data"
    meta_path = target / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        expected_tokenizer = str(tokenizer) if tokenizer else f"bpe:{bpe_vocab}"
        if meta.get("sources") != [str(corpus)] or not str(meta.get("tokenizer", "")).startswith(expected_tokenizer):
            raise ValueError(f"invalid --corpus/--tokenizer: {target} contains data prepared from {meta.get('sources')} "
                             f"with tokenizer {meta.get('tokenizer')!r}; use another --out or the same inputs")
        return str(target)
    if not create:
        return str(target)
    from aoe.data.prepare import prepare_corpus

    print(f"preparing {corpus} into {target}", flush=True)
    prepare_corpus(target, input_path=corpus, tokenizer=tokenizer, bpe_vocab_size=None if tokenizer else bpe_vocab)
    return str(target)


def build_run_configs(plan: list[tuple[str, int]], scale: str, data_path: str, runs_dir: Path,
                      overrides: list[str]) -> list:
    """Build every run's RunConfig, with the vocabulary of the data folder and the overrides applied."""
    from aoe.config_utils import apply_overrides
    from aoe.train.config import RunConfig, read_data_meta

    vocab_size = read_data_meta(data_path)["vocab_size"] if (Path(data_path) / "meta.json").is_file() else None
    configs = []
    for name, seed in plan:
        config = grid_run(name, seed, scale, data_path=data_path, out_dir=str(runs_dir), vocab_size=vocab_size)
        if overrides:
            config = RunConfig.from_dict(apply_overrides(config.to_dict(), overrides, RunConfig))
        configs.append(config)
    return configs


# ----- running -----------------------------------------------------------------------------


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    items: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            items.update(_flatten(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def config_differences(stored: dict[str, Any], config) -> list[str]:
    """List the fields (dotted) where a run folder's config.json differs from ``config``."""
    new = _flatten(json.loads(json.dumps(config.to_dict())))
    old = _flatten(stored)
    keys = (set(new) | set(old)) - IGNORED_CONFIG_KEYS
    return sorted(k for k in keys if old.get(k) != new.get(k))


def finished_run(config) -> bool:
    """Check whether the run folder of ``config`` contains a finished run of this config.

    Finished means summary.json parses and records every step of schedule.max_steps. A
    finished run of a *different* config raises ValueError, so that a sweep never mixes
    recipes in one report.
    """
    run_dir = config.run_dir
    summary = _read_json(run_dir / "summary.json")
    if summary is None or summary.get("steps", 0) < config.schedule.max_steps:
        return False
    stored = _read_json(run_dir / "config.json")
    if stored is None:
        return False
    differences = config_differences(stored, config)
    if differences:
        shown = ", ".join(f"{k}" for k in differences[:5])
        raise ValueError(f"invalid sweep config: run folder {run_dir} contains a finished run with a different config ({shown}); "
                         "use another --out, or delete that folder to rerun it")
    return True


def run_grid(configs: list) -> list[tuple[str, str]]:
    """Train every config that has no finished run; return (run name, error) for each failed run."""
    from aoe.train.config import check_data
    from aoe.train.trainer import train

    for config in configs:
        check_data(config)
    todo = [c for c in configs if not finished_run(c)]
    print(f"sweep: {len(configs)} runs planned, {len(configs) - len(todo)} already finished, {len(todo)} to run",
          flush=True)
    failures = []
    for index, config in enumerate(todo, 1):
        # Another sweep may have finished or started this run since the plan was made.
        if finished_run(config) or not acquire_run_lock(config.run_dir):
            print(f"sweep: [{index}/{len(todo)}] {config.name}: another sweep has it, skipped", flush=True)
            continue
        print(f"sweep: [{index}/{len(todo)}] {config.name}", flush=True)
        started = time.perf_counter()
        try:
            result = train(config)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one failed run (e.g. a non-finite loss) must not stop the grid
            print(f"sweep: run {config.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            failures.append((config.name, f"{type(exc).__name__}: {exc}"))
            continue
        finally:
            release_run_lock(config.run_dir)
        print(f"sweep: {config.name} finished in {time.perf_counter() - started:.0f} s, "
              f"val loss {result.metrics.get('val_loss')}", flush=True)
    return failures


LOCK_FILE = "sweep.lock"


def acquire_run_lock(run_dir: Path) -> bool:
    """Create RUN/sweep.lock with this process id; return False if a live process holds it.

    A lock left by a process that no longer exists (a killed sweep) is taken over.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _lock_owner_alive(path):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def _lock_owner_alive(path: Path) -> bool:
    try:
        pid = int(path.read_text().strip() or "0")
    except (FileNotFoundError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_run_lock(run_dir: Path) -> None:
    path = run_dir / LOCK_FILE
    try:
        if int(path.read_text().strip() or "0") == os.getpid():
            path.unlink()
    except (FileNotFoundError, ValueError):
        pass


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ----- collecting finished runs --------------------------------------------------------------


@dataclass
class RunRecord:
    """One finished run, as its folder records it."""

    name: str  # grid configuration
    seed: int
    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    routing: dict[str, Any] = field(default_factory=dict)

    def train_losses(self) -> tuple[list[int], list[float]]:
        """Per-step cross-entropy (without the auxiliary loss) from metrics.jsonl."""
        steps, losses = [], []
        path = self.run_dir / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "train" and record.get("ce_loss") is not None:
                steps.append(record["step"])
                losses.append(record["ce_loss"])
        return steps, losses

    def val_routing(self) -> list[dict[str, Any]]:
        """Per sparse layer routing statistics of the final model on the validation batches."""
        return [layer for layer in self.summary.get("routing_val") or [] if layer is not None]


def collect_runs(runs_dir: Path) -> list[RunRecord]:
    """Read every finished run folder NAME-seedS in ``runs_dir`` whose NAME is a grid configuration."""
    records = []
    for run_dir in sorted(p for p in runs_dir.glob("*") if p.is_dir()):
        match = RUN_NAME_PATTERN.match(run_dir.name)
        if match is None or match["name"] not in GRID:
            continue
        summary = _read_json(run_dir / "summary.json")
        config = _read_json(run_dir / "config.json")
        if summary is None or config is None:
            continue
        if summary.get("steps", 0) < config.get("schedule", {}).get("max_steps", math.inf):
            continue
        routing = _read_json(run_dir / "routing.json") or {}
        records.append(RunRecord(match["name"], int(match["seed"]), run_dir, config, summary, routing))
    return records


# ----- statistics ----------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def welch_z(a: list[float], b: list[float]) -> float:
    """Difference of means mean(a) - mean(b) over its standard error sqrt(s_a^2/n_a + s_b^2/n_b).

    NaN when either side has fewer than two values, because the standard error is then unknown.
    """
    if len(a) < 2 or len(b) < 2:
        return math.nan
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    error = math.sqrt(std_a**2 / len(a) + std_b**2 / len(b))
    if error > 0:
        return (mean_a - mean_b) / error
    return math.copysign(math.inf, mean_a - mean_b) if mean_a != mean_b else math.nan


def per_layer_mean(records: list[RunRecord], key: str) -> list[float]:
    """Mean over runs of a per-layer validation routing statistic (``ent_load`` or ``ent_conf``)."""
    per_run = [[layer[key] for layer in r.val_routing()] for r in records]
    per_run = [values for values in per_run if values]
    if not per_run:
        return []
    num_layers = min(len(values) for values in per_run)
    return [statistics.fmean(values[i] for values in per_run) for i in range(num_layers)]


def mean_curve(records: list[RunRecord]) -> tuple[list[int], list[float]]:
    """Training cross-entropy averaged over seeds at the steps every run recorded."""
    curves = [dict(zip(*r.train_losses())) for r in records]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [statistics.fmean(c[s] for c in curves) for s in steps]


def norm_history(record: RunRecord) -> tuple[list[int], list[list[list[float]]]]:
    """Return the steps and each sparse layer's per-expert mean score in every logged training window of one run."""
    steps, scores = [], []
    for window in record.routing.get("train", []):
        layers = [layer["mean_score"] for layer in window.get("layers", []) if layer is not None]
        if layers:
            steps.append(window["step"])
            scores.append(layers)
    return steps, scores


# ----- the report --------------------------------------------------------------------------


def _fmt_pm(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _millions(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f}M"


def write_sweep_report(out: Path, report_path: Path, figures_dir: Path, prefix: str = "sweep",
                       title: str = "MoE and AoE comparison grid") -> Path:
    """Write the markdown report and its figures from every finished run in OUT/runs."""
    from aoe.analysis import plots
    from aoe.train.checkpoint import atomic_write_text

    records = collect_runs(out / "runs")
    by_name: dict[str, list[RunRecord]] = {}
    for record in records:
        by_name.setdefault(record.name, []).append(record)
    names = [n for n in GRID if n in by_name]
    labels = {n: GRID[n].label for n in names}
    # Figure links are relative to the report, so the report and its figures can move together.
    figures_link = Path(os.path.relpath(figures_dir, report_path.parent)).as_posix()

    def figure_ref(file_name: str) -> str:
        return f"{figures_link}/{file_name}"

    lines = [f"# {title}", "", "Generated by `aoe sweep` from the run folders in "
             f"`{out / 'runs'}`. Every number below is read from those folders.", ""]
    if records:
        data_path = records[0].config["data"]["path"]
        lines += [f"Train the grid (finished runs are skipped; start it in several shells to run in parallel): "
                  f"`aoe sweep --out {out} --data {data_path}`. Rewrite this report: add `--report-only`.", ""]
    planned = sum(count for _, count in grid_lib.default_grid())
    lines += [f"Finished runs: {len(records)} (the default grid has {planned}).", ""]
    reference = _unigram_reference(records)
    lines += _recipe_section(records, reference)
    lines += _results_table(names, by_name)
    lines += _comparison_section(by_name, reference)
    missing = [n for n in GRID if n not in by_name]
    if missing:
        lines += ["## Missing configurations", "",
                  "No finished run yet for: " + ", ".join(f"`{n}`" for n in missing) + ".", ""]

    if names:
        panels: dict[str, dict[str, Any]] = {"Table 2 rows and the dense baseline": {}, "Table 3 rows (and MoE/AoE + L_aux)": {}}
        for n in names:
            curve = mean_curve(by_name[n])
            if GRID[n].table == "Table 3" or n in (grid_lib.HEADLINE_MOE, grid_lib.HEADLINE_AOE):
                panels["Table 3 rows (and MoE/AoE + L_aux)"][labels[n]] = curve
            if GRID[n].table != "Table 3":
                panels["Table 2 rows and the dense baseline"][labels[n]] = curve
        panels = {k: v for k, v in panels.items() if v}
        loss_png = plots.plot_loss_curves(panels, figures_dir / f"{prefix}_loss.png")
        lines += ["## Training loss (Figure 2 analogue)", "",
                  "Training cross-entropy per step (without L_aux), mean over seeds, trailing mean over 20 steps.", "",
                  f"![training loss]({figure_ref(loss_png.name)})", ""]

        sparse = [n for n in names if GRID[n].kind != "dense"]
        ent_load = {labels[n]: per_layer_mean(by_name[n], "ent_load") for n in sparse}
        ent_conf = {labels[n]: per_layer_mean(by_name[n], "ent_conf") for n in sparse}
        if any(ent_conf.values()):
            entropy_png = plots.plot_routing_entropy(ent_load, ent_conf, figures_dir / f"{prefix}_entropy.png")
            lines += ["## Load and confidence entropy per layer (Figure 3 analogue)", "",
                      "Measured on the validation batches with the final weights, mean over seeds. Ent_load is the "
                      "entropy of the share of assignments each expert receives (ln 8 = 2.079 is perfectly balanced). "
                      "Ent_conf is the mean over tokens of the entropy of softmax over all 8 scores (router logits "
                      "for MoE, activation norms for AoE); low values mean confident selection.", "",
                      f"![routing entropy]({figure_ref(entropy_png.name)})", ""]
            lines += _entropy_table(sparse, labels, ent_load, ent_conf)

        aoe_names = [n for n in names if GRID[n].kind == "aoe"]
        if len(aoe_names) > 4:
            aoe_names = [n for n in aoe_names if f"dlow{grid_lib.TABLE3_D_LOW}" in n]
        # A run writes val_final into routing.json last, so its presence marks a complete file.
        norm_runs = {n: next((r for r in by_name[n] if "val_final" in r.routing), by_name[n][0]) for n in aoe_names}
        histories = {f"{labels[n]} (seed {norm_runs[n].seed})": norm_history(norm_runs[n]) for n in aoe_names}
        histories = {k: v for k, v in histories.items() if v[0]}
        if histories:
            norms_png = plots.plot_expert_norms(histories, figures_dir / f"{prefix}_expert_norms.png")
            lines += ["## AoE expert activation norms over training (Figure 4 analogue)", "",
                      "Each expert's mean L2 norm of its low-rank activation x W_down over the training tokens of "
                      "every evaluation interval, per layer, for one seed of each AoE configuration at "
                      f"d_low {grid_lib.TABLE3_D_LOW} (paper scale; scaled at the CPU scale).", "",
                      f"![expert norms]({figure_ref(norms_png.name)})", ""]
            lines += _norm_spread_lines(aoe_names, norm_runs, labels)

    report_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_path, "\n".join(lines) + "\n")
    return report_path


def _unigram_reference(records: list[RunRecord]) -> float | None:
    """The unigram cross-entropy on the validation tokens of the runs (None without runs or data)."""
    if not records:
        return None
    config = records[0].config
    data = config["data"]
    val_tokens = config["train"]["eval_batches"] * data["micro_batch_size"] * (data["seq_len"] + 1)
    return unigram_cross_entropy(data["path"], val_tokens)


def _recipe_section(records: list[RunRecord], reference: float | None) -> list[str]:
    if not records:
        return ["No finished runs yet.", ""]
    config = records[0].config
    model, data, optim, schedule = config["model"], config["data"], config["optim"], config["schedule"]
    tokens = data["seq_len"] * data["micro_batch_size"] * data["grad_accum_steps"]
    meta = _read_json(Path(data["path"]) / "meta.json") or {}
    lines = ["## Recipe", "",
             f"- Model: {model['n_layers']} layers, d_model {model['d_model']}, {model['attention']['n_heads']} heads, "
             f"vocabulary {model['vocab_size']:,} (tied embeddings: {model['tie_embeddings']}); sparse layers have "
             f"{model['ffn']['n_experts']} experts, top-{model['ffn']['top_k']}, MoE expert width {model['ffn']['d_ffn']}.",
             f"- Data: `{data['path']}` (tokenizer: {meta.get('tokenizer', 'see meta.json')}; "
             f"{meta.get('num_tokens', {}).get('train', 'n/a'):,} training and "
             f"{meta.get('num_tokens', {}).get('val', 'n/a'):,} validation tokens); the same data order "
             f"(data seed {data['seed']}) for every run; the seed changes only the initialisation.",
             f"- Training: {schedule['max_steps']} steps of {data['micro_batch_size'] * data['grad_accum_steps']} "
             f"sequences x {data['seq_len']} tokens = {tokens:,} tokens per step, "
             f"{tokens * schedule['max_steps']:,} tokens per run; AdamW lr {optim['lr']:g}, betas {tuple(optim['betas'])}, "
             f"weight decay {optim['weight_decay']:g}, clipping {optim['grad_clip']:g}; {schedule['warmup_steps']} "
             f"warm-up steps, cosine decay to {schedule['min_lr']:g}; {config['train']['precision']} on "
             f"{config['train']['device']}, {config['train'].get('num_threads') or 'default'} thread(s).",
             f"- Validation: {config['train']['eval_batches']} batches of {data['micro_batch_size']} x {data['seq_len']} "
             "tokens from the held-out documents, after the last step.",
             ""]
    if reference is not None:
        lines[-1:-1] = [f"- Reference point: a unigram model (add-one smoothed token frequencies of the training "
                        f"split) scores {reference:.3f} nats per token on those validation tokens, and a uniform "
                        f"guess scores ln {model['vocab_size']} = {math.log(model['vocab_size']):.3f}. A validation "
                        "loss near the unigram value means the model has learned little beyond token frequencies."]
    return lines


def unigram_cross_entropy(data_path: str, num_val_tokens: int) -> float | None:
    """Cross-entropy of the first ``num_val_tokens`` validation tokens under the training split's unigram distribution."""
    try:
        import numpy as np

        from aoe.data.loader import TokenDataset

        train = TokenDataset(data_path, "train", verify=False)
        val = TokenDataset(data_path, "val", verify=False)
    except (FileNotFoundError, ValueError, KeyError):
        return None
    counts = np.zeros(train.vocab_size, dtype=np.float64)
    chunk = 1 << 24
    for start in range(0, len(train), chunk):
        counts += np.bincount(train.tokens(start, min(start + chunk, len(train))), minlength=train.vocab_size)
    log_probs = np.log(counts + 1.0) - np.log(counts.sum() + train.vocab_size)
    tokens = val.tokens(0, min(num_val_tokens, len(val)))
    return float(-log_probs[tokens].mean()) if len(tokens) else None


def _results_table(names: list[str], by_name: dict[str, list[RunRecord]]) -> list[str]:
    lines = ["## Results", "",
             "Mean ± sample standard deviation over seeds. Tokens/s is the training throughput of each run "
             "(one thread; other jobs shared the machine, so treat it as rough). The paper's column is its "
             "average downstream accuracy (732M models, 100B tokens) for reference; it is not comparable "
             "with these losses. Active parameters count the embedding table twice (input and output), as the "
             "paper does, so a dense model with tied embeddings has more active than total parameters. Experts "
             "per token is measured over training.", "",
             "| configuration | paper table | seeds | val loss | val ppl | Δ val loss vs MoE + L_aux | tokens/s | "
             "experts per token | active / total params | paper avg acc |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = [r.summary["val_loss"] for r in by_name.get(grid_lib.HEADLINE_MOE, [])]
    base_mean = mean_std(base)[0] if base else math.nan
    for n in names:
        runs = by_name[n]
        loss = mean_std([r.summary.get("val_loss") for r in runs])
        ppl = mean_std([r.summary.get("val_ppl") for r in runs])
        speed = mean_std([r.summary.get("tokens_per_s") for r in runs])
        delta = "n/a" if math.isnan(base_mean) else f"{loss[0] - base_mean:+.3f}"
        summary = runs[0].summary
        paper = GRID[n].paper_avg
        # Measured over training; top-P makes it data-dependent, expert choice makes it 2 on average.
        active = mean_std([r.summary.get("mean_active_experts") for r in runs])[0]
        lines.append(f"| {GRID[n].label} (`{n}`) | {GRID[n].table} | {len(runs)} | {_fmt_pm(*loss)} | "
                     f"{_fmt_pm(*ppl, digits=1)} | {delta} | {speed[0]:,.0f} | "
                     f"{'' if math.isnan(active) else f'{active:.2f}'} | "
                     f"{_millions(summary.get('active_params'))} / {_millions(summary.get('total_params'))} | "
                     f"{'' if paper is None else f'{paper:.2f}'} |")
    lines.append("")
    for n in names:
        active = mean_std([r.summary.get("mean_active_experts") for r in by_name[n]])[0]
        top_k = by_name[n][0].config["model"]["ffn"].get("top_k", 0)
        if GRID[n].selection == "top_p" and active > top_k:
            lines += [f"{GRID[n].label} selected {active:.2f} experts per token on average (top-{top_k} rows select "
                      f"{top_k}), so its expert compute per token is {active / top_k:.1f} times theirs.", ""]
    return lines


def _comparison_section(by_name: dict[str, list[RunRecord]], reference: float | None = None) -> list[str]:
    moe = [r.summary["val_loss"] for r in by_name.get(grid_lib.HEADLINE_MOE, [])]
    aoe = [r.summary["val_loss"] for r in by_name.get(grid_lib.HEADLINE_AOE, [])]
    moe_label, aoe_label = GRID[grid_lib.HEADLINE_MOE].label, GRID[grid_lib.HEADLINE_AOE].label
    lines = ["## Does AoE beat MoE?", ""]
    if not moe or not aoe:
        return lines + [f"Not answered yet: {moe_label} has {len(moe)} and {aoe_label} {len(aoe)} finished runs.", ""]
    (m_mean, m_std), (a_mean, a_std) = mean_std(moe), mean_std(aoe)
    z = welch_z(moe, aoe)
    verdict = "equal"
    if a_mean < m_mean:
        verdict = "lower (better)"
    elif a_mean > m_mean:
        verdict = "higher (worse)"
    sentence = (f"{aoe_label} reaches a validation loss of {a_mean:.4f} ± {a_std:.4f} ({len(aoe)} seeds) against "
                f"{m_mean:.4f} ± {m_std:.4f} for {moe_label} ({len(moe)} seeds): AoE's loss is {verdict} by "
                f"{abs(m_mean - a_mean):.4f}")
    if math.isfinite(z):
        larger = max(m_std, a_std)
        spread = f"{abs(m_mean - a_mean) / larger:.1f} times the larger per-configuration standard deviation" if larger > 0 else "n/a"
        sentence += (f", which is {abs(z):.1f} standard errors of the difference (Welch, sqrt(s_a²/n_a + s_b²/n_b)) "
                     f"and {spread}.")
        if abs(z) < 2:
            sentence += " With this many seeds that difference is within the seed-to-seed noise."
    else:
        sentence += "; with fewer than two seeds on one side the noise level is unknown."
    lines += [sentence, ""]
    if reference is not None:
        best = min(m_mean, a_mean)
        note = f"The better of the two is {reference - best:.3f} nats below the unigram reference ({reference:.3f})."
        if reference - best < 0.5:
            note += (" Both models have learned little more than token frequencies, so this comparison describes "
                     "the first steps of training, not trained language models.")
        lines += [note, ""]
    return lines


def _entropy_table(sparse: list[str], labels: dict[str, str], ent_load: dict[str, list[float]],
                   ent_conf: dict[str, list[float]]) -> list[str]:
    lines = ["| configuration | Ent_load per layer | mean Ent_load | Ent_conf per layer | mean Ent_conf |",
             "|---|---|---|---|---|"]
    for n in sparse:
        load, conf = ent_load[labels[n]], ent_conf[labels[n]]
        if not load:
            continue
        lines.append(f"| {labels[n]} | {', '.join(f'{v:.3f}' for v in load)} | {statistics.fmean(load):.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in conf)} | {statistics.fmean(conf):.3f} |")
    lines.append("")

    moe, aoe = labels.get(grid_lib.HEADLINE_MOE), labels.get(grid_lib.HEADLINE_AOE)
    if moe in ent_load and aoe in ent_load and ent_load[moe] and ent_load[aoe]:
        load_m, load_a = statistics.fmean(ent_load[moe]), statistics.fmean(ent_load[aoe])
        conf_m, conf_a = ent_conf[moe], ent_conf[aoe]
        falls = all(b <= a for a, b in zip(conf_a, conf_a[1:]))
        lines += [
            "Against the paper's findings (732M models with L_aux: AoE's Ent_load slightly higher than MoE's, "
            "2.023 vs 2.015; AoE's Ent_conf much lower, and falling from shallow to deep layers):", "",
            f"- Ent_load, mean over layers: {aoe} {load_a:.3f} vs {moe} {load_m:.3f} "
            f"({'higher' if load_a > load_m else 'lower' if load_a < load_m else 'equal'} for AoE).",
            f"- Ent_conf, mean over layers: {aoe} {statistics.fmean(conf_a):.3f} vs {moe} {statistics.fmean(conf_m):.3f}; "
            f"AoE is lower in {sum(a < m for a, m in zip(conf_a, conf_m))} of {min(len(conf_a), len(conf_m))} layers.",
            f"- AoE's Ent_conf from the first to the last layer: {', '.join(f'{v:.3f}' for v in conf_a)} "
            f"({'falls monotonically' if falls else 'does not fall monotonically'} with depth).", ""]
    return lines


def _norm_spread_lines(aoe_names: list[str], norm_runs: dict[str, RunRecord], labels: dict[str, str]) -> list[str]:
    """Summarise how close the experts of a layer end up: max/min ratio of their final mean norms."""
    lines = []
    for n in aoe_names:
        steps, scores = norm_history(norm_runs[n])
        if not scores:
            continue
        ratios = [max(layer) / min(layer) for layer in scores[-1] if min(layer) > 0]
        lines.append(f"- {labels[n]}: in the last interval, the largest expert's mean norm is "
                     f"{', '.join(f'{r:.2f}' for r in ratios)} times the smallest's (per layer).")
    return lines + [""] if lines else []
