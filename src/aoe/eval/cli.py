"""``aoe eval MODEL --tasks ...``: downstream accuracy with lm-evaluation-harness, or held-out perplexity.

MODEL is a run folder (scored with the native model), an exported Hugging Face folder, or a
Hugging Face model path. ``--data-dir`` switches to the task configs shipped in
aoe/eval/tasks, which read local copies of the datasets and work offline. Without it the
standard lm-eval tasks run, and they download their data from the Hugging Face hub.
Results go to OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from aoe.eval import suite

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="run folder, exported Hugging Face folder, or Hugging Face model path")
    parser.add_argument("--tasks", default="paper",
                        help="'paper' (the ten tasks of the AoE paper) and/or a comma-separated list of: "
                             + ", ".join(suite.SHOTS) + "; 'none' with --perplexity for perplexity only")
    parser.add_argument("--data-dir", default=None,
                        help="folder with local copies of the datasets; uses aoe's offline task configs")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most N examples per task (quick runs)")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="override every task's number of in-context examples (default: the paper's)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the run's or the model folder's)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run folder (default: newest)")
    parser.add_argument("--no-bos", action="store_true", help="do not start requests with BOS")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=1234, help="seed for few-shot example sampling")
    parser.add_argument("--perplexity", action="store_true",
                        help="also report held-out perplexity on the val split of a run folder's data.path")
    parser.add_argument("--ppl-batches", type=int, default=None,
                        help="with --perplexity: evaluate at most this many batches (default: the whole split)")
    parser.add_argument("--output", default=None,
                        help="output folder (default: RUN/eval/<tasks> for a run folder, else "
                             "eval_results/<name>/<tasks>, so evaluations of other task sets are kept)")


def default_output(model: str, is_run: bool, tasks_spec: str, limit: int | None, perplexity: bool) -> Path:
    """Return a results folder named after the evaluation, so a later evaluation never replaces another's results."""
    label = "+".join(part.strip().lower() for part in tasks_spec.split(",") if part.strip()) or "none"
    if limit is not None:
        label += f"-limit{limit}"
    if perplexity:
        label += "-perplexity"
    base = Path(model) / "eval" if is_run else Path("eval_results") / Path(model.rstrip("/")).name
    return base / label


def check_output_dir(out_dir: Path) -> None:
    """Raise ValueError unless results can be written under ``out_dir``; creates nothing.

    Runs before the evaluation, so a wrong --output does not cost an evaluation run.
    """
    existing = next(path for path in (out_dir, *out_dir.absolute().parents) if path.exists())
    if existing == out_dir and not out_dir.is_dir():
        raise ValueError(f"invalid --output {out_dir}: it exists and is not a folder")
    if not existing.is_dir():
        raise ValueError(f"invalid --output {out_dir}: {existing} is a file, so the folder cannot be created")
    try:
        # A real file creation, because os.access grants root write access whatever the permission bits say.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ValueError(f"invalid --output {out_dir}: cannot write to {existing} ({exc.strerror or exc})") from exc


def task_manager(data_dir: str | None):
    """lm-eval's task index: only aoe's local configs with ``data_dir``, else the built-in tasks."""
    from lm_eval.tasks import TaskManager

    if data_dir is not None:
        # Indexing only this folder takes well under a second; the built-in index takes minutes on a busy CPU.
        return TaskManager(include_path=str(suite.TASKS_DIR), include_defaults=False,
                           metadata={"data_dir": str(data_dir)})
    return TaskManager()


def evaluate_task(lm, manager, task: str, local: bool, limit: int | None, num_fewshot: int | None,
                  seed: int) -> dict:
    """Run one task through lm-eval; returns {"acc", "acc_stderr", "metrics", "lm_eval_task", "shots", ...}."""
    from lm_eval import simple_evaluate

    name = suite.LOCAL_TASKS[task] if local else suite.HUB_TASKS[task]
    shots = suite.SHOTS[task] if num_fewshot is None else num_fewshot
    out = simple_evaluate(model=lm, tasks=[name], num_fewshot=shots, limit=limit, task_manager=manager,
                          log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed)
    metrics = out["results"][name]
    return {"acc": metrics["acc,none"], "acc_stderr": metrics.get("acc_stderr,none"),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "lm_eval_task": name, "shots": shots, "n_samples": out.get("n-samples", {})}


def run_perplexity(run_dir: str, step: int | None, batch_size: int, max_batches: int | None) -> dict:
    """Held-out perplexity of a run folder's model on the val split of its prepared data."""
    from aoe.data.loader import TokenDataset, eval_batches
    from aoe.eval.perplexity import evaluate_perplexity
    from aoe.hf.run_dir import load_run_model

    model, config = load_run_model(run_dir, step=step)
    data = config.get("data") or {}
    dataset = TokenDataset(data["path"], split="val")
    batches = eval_batches(dataset, batch_size, data.get("seq_len", model.config.max_seq_len), max_batches)
    return evaluate_perplexity(model, batches, progress=True)


def run(args: argparse.Namespace) -> int:
    from aoe.eval.formats import find_task_file
    from aoe.eval.models import check_device, is_run_dir, load_lm
    from aoe.train.checkpoint import atomic_write_text

    check_device(args.device)
    out_dir = (Path(args.output) if args.output
               else default_output(args.model, is_run_dir(args.model), args.tasks, args.limit, args.perplexity))
    check_output_dir(out_dir)
    tasks = [] if args.tasks.strip().lower() == "none" else suite.parse_tasks(args.tasks)
    if not tasks and not args.perplexity:
        raise ValueError("--tasks none leaves nothing to evaluate; add --perplexity or name tasks")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"invalid --limit={args.limit}: expected a positive integer")
    if args.data_dir is not None:
        if not Path(args.data_dir).is_dir():
            raise FileNotFoundError(f"--data-dir {args.data_dir} is not a folder")
        # Local tasks never need the hub; stop datasets and transformers from trying it.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    loaded = load_lm(args.model, tokenizer=args.tokenizer, step=args.step, batch_size=args.batch_size,
                     add_bos=not args.no_bos, device=args.device)

    perplexity = None
    if args.perplexity:
        if loaded.kind != "run":
            raise ValueError("--perplexity needs a run folder, whose data.path names the held-out split")
        perplexity = run_perplexity(args.model, args.step, args.batch_size, args.ppl_batches)
        print(f"held-out perplexity {perplexity['ppl']:.3f} (loss {perplexity['loss']:.4f} over "
              f"{int(perplexity['tokens'])} tokens)")

    manager = task_manager(args.data_dir)
    scores: dict[str, float | str] = {}
    details: dict[str, dict] = {}
    started = time.perf_counter()
    for task in tasks:
        if args.data_dir is not None:
            try:
                find_task_file(task, args.data_dir)
            except FileNotFoundError as exc:
                print(f"{task}: {suite.MISSING} ({exc})")
                scores[task], details[task] = suite.MISSING, {"status": suite.MISSING, "reason": str(exc)}
                continue
        task_start = time.perf_counter()
        try:
            result = evaluate_task(loaded.lm, manager, task, args.data_dir is not None, args.limit, args.num_fewshot,
                                   args.seed)
        except (FileNotFoundError, ConnectionError, OSError) as exc:
            # Hub tasks whose data cannot be fetched (offline machine) count as missing.
            log.warning("task %s could not load its data: %s", task, exc)
            print(f"{task}: {suite.MISSING} ({type(exc).__name__}: {exc})")
            scores[task], details[task] = suite.MISSING, {"status": suite.MISSING, "reason": f"{type(exc).__name__}: {exc}"}
            continue
        result["seconds"] = round(time.perf_counter() - task_start, 2)
        scores[task], details[task] = result["acc"], {"status": "ok", **result}
        print(f"{task}: acc {100 * result['acc']:.2f} ({result['shots']}-shot, {result['seconds']:.1f} s)")

    name = Path(args.model.rstrip("/")).name
    table = suite.results_table(scores, name) if scores else ""

    report = {"model": args.model, "model_info": loaded.info, "data_dir": args.data_dir, "limit": args.limit,
              "add_bos": loaded.lm.add_bos, "scores": scores, "tasks": details, "perplexity": perplexity,
              "seconds": round(time.perf_counter() - started, 2)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2) + "\n")
    note = f"\nAccuracy in percent; at most {args.limit} examples per task (--limit).\n" if args.limit else ""
    if perplexity is not None:
        note += f"\nHeld-out perplexity: {perplexity['ppl']:.3f} over {int(perplexity['tokens'])} tokens.\n"
    atomic_write_text(out_dir / "results.md", table + note)
    print(table, end="")
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0

