"""The training loop: ``train(RunConfig) -> RunResult``.

One optimizer step reads grad_accum_steps micro-batches, backpropagates each, clips the global
gradient norm and steps AdamW at the LR of ``lr_at``. The loss of a step is normalised by the
valid targets of the whole step, not of each micro-batch, so that accumulation gives the same
gradient as one large batch whatever the padding:

    loss = sum_i CE_sum_i / N + sum_i (n_i / N) * aux_i,   N = sum_i n_i valid targets.

Resuming: a run folder that already contains checkpoints of the same config continues from the
newest good one (set checkpoint.resume=false to reject such a folder instead). Every step is
then repeated bit for bit, because the checkpoint holds the weights, the optimizer, the step,
the data-loader position and the RNG states, and deterministic algorithms are on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from aoe.config_utils import ConfigError
from aoe.layers.routing import RoutingStats
from aoe.model.decoder import IGNORE_INDEX, Transformer
from aoe.train.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    atomic_write_text,
    checkpoint_root,
    clean_partial_writes,
    list_checkpoints,
    save_checkpoint,
    scan_checkpoints,
    set_aside,
)
from aoe.train.config import RunConfig, check_data
from aoe.train.distributed import (
    DistributedContext,
    close_distributed,
    gather_loader_states,
    init_distributed,
    load_any_checkpoint,
    parallelize,
    resume_loader,
    save_distributed_checkpoint,
)
from aoe.train.metrics import (
    PEAK_FILE,
    MetricsLog,
    RoutingSums,
    memory_mb,
    merge_routing,
    peak_flops,
    routing_from_tensors,
    routing_summary,
    routing_to_tensors,
)
from aoe.train.optim import build_optimizer
from aoe.train.report import write_report
from aoe.train.schedule import lr_at

log = logging.getLogger("aoe.train")

# Config fields that may change between a run and its resumption without changing any result.
RESUMABLE_CHANGES = {"train.log_interval", "train.progress", "train.tensorboard", "checkpoint.keep_last",
                     "checkpoint.interval", "checkpoint.resume", "train.peak_flops",
                     # A DCP checkpoint resumes at any world size and parallel mode.
                     "parallel.mode", "parallel.backend", "parallel.reshard_after_forward", "parallel.timeout_s"}


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


@dataclass
class StepLoss:
    """Losses and routing statistics of one optimizer step's forward and backward passes."""

    loss: float  # ce_loss + aux_loss, the value that was backpropagated
    ce_loss: float  # summed cross-entropy / valid targets of the step
    aux_loss: float  # valid-target-weighted mean of the micro-batches' aux losses
    num_valid: int
    routing: RoutingSums = field(default_factory=list)
    grad_norm: float = 0.0  # global norm before clipping, set after backward
    lr: float = 0.0


# ----- one step ------------------------------------------------------------------------------


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(model: Transformer, micro_batches: list[Any], precision: str = "fp32") -> StepLoss:
    """Accumulate the gradients of one optimizer step over ``micro_batches``.

    Each batch has ``input_ids`` and ``labels`` (B, S), labels -100 where no loss is taken.
    A micro-batch without valid targets is skipped (it adds 0 to the loss). When no micro-batch
    has any, nothing is backpropagated and num_valid is 0.
    """
    device = next(model.parameters()).device
    counts = [int((batch.labels != IGNORE_INDEX).sum()) for batch in micro_batches]
    total = sum(counts)
    if total == 0:
        return StepLoss(0.0, 0.0, 0.0, 0, [])

    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    aux_sum = torch.zeros((), dtype=torch.float64, device=device)
    routing: RoutingSums | None = None
    for batch, count in zip(micro_batches, counts):
        if count == 0:
            continue
        input_ids = batch.input_ids.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        with autocast_context(precision, device):
            out = model(input_ids, labels=labels)
        aux_weight = count / total
        loss = out.ce_sum / total + out.aux_loss * aux_weight
        loss.backward()
        ce_sum += out.ce_sum.detach().double()
        aux_sum += out.aux_loss.detach().double() * aux_weight
        routing = merge_routing(routing, [r.stats if r is not None else None for r in out.routing])

    ce_loss = float(ce_sum) / total
    aux_loss = float(aux_sum)
    return StepLoss(ce_loss + aux_loss, ce_loss, aux_loss, total, routing or [])


@torch.no_grad()
def evaluate(model: Transformer, batches: Iterable[Any], precision: str = "fp32") -> tuple[dict[str, float], RoutingSums]:
    """Mean cross-entropy per valid target (no aux loss), perplexity and routing statistics."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ce_sum, num_valid, routing = 0.0, 0, None
    for batch in batches:
        with autocast_context(precision, device):
            out = model(batch.input_ids.to(device), labels=batch.labels.to(device))
        ce_sum += float(out.ce_sum)
        num_valid += int(out.num_valid)
        routing = merge_routing(routing, [r.stats if r is not None else None for r in out.routing])
    model.train(was_training)
    if num_valid == 0:
        return {"val_loss": float("nan"), "val_ppl": float("nan"), "val_tokens": 0}, routing or []
    val_loss = ce_sum / num_valid
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "val_tokens": num_valid}, routing or []


# ----- setup -------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("invalid train.device='cuda': this torch build sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device(name)


@dataclass
class DataSources:
    train_loader: Any  # PackedLoader: iterates Batch forever, state_dict()/load_state_dict()
    val_batches: list[Any]


def open_data(config: RunConfig, rank: int = 0, world_size: int = 1) -> DataSources:
    """Open the train loader (this rank's disjoint share of the windows) and the fixed validation batches."""
    from aoe.data.loader import PackedLoader, TokenDataset, eval_batches

    data = config.data
    train_set = TokenDataset(data.path, split="train")
    loader = PackedLoader(train_set, batch_size=data.micro_batch_size, seq_len=data.seq_len, seed=data.seed,
                          rank=rank, world_size=world_size)
    val = []
    if config.train.eval_batches > 0:
        val_set = TokenDataset(data.path, split="val")
        val = list(eval_batches(val_set, data.micro_batch_size, data.seq_len, max_batches=config.train.eval_batches))
    return DataSources(loader, val)


def _flat_items(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    items = {}
    for key, value in data.items():
        if isinstance(value, dict):
            items.update(_flat_items(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


# Files and folders of a run folder: a wrong kind of entry under one of these names would fail
# only after training started (at the first save, log line or evaluation).
RUN_FILES = ("config.json", "metrics.jsonl", "train.log", "routing.json", "summary.json", "report.md", PEAK_FILE)
RUN_FOLDERS = (CHECKPOINT_DIR, "tb")


def _run_dir_error(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"invalid run folder entry {path}: {problem}; move it away or pick another "
                       "train.out_dir or train.run_name")


def create_run_dir(config: RunConfig) -> Path:
    """Create the run folder, after checking that nothing in the way would fail later in the run."""
    run_dir = config.run_dir
    out_dir = Path(config.train.out_dir)
    for path, field_name in ((out_dir, "train.out_dir"), (run_dir, "train.run_name")):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"invalid {field_name}: {path} is a file, expected a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"invalid train.out_dir={config.train.out_dir!r}: cannot create the run folder "
                          f"{run_dir} ({exc.strerror})") from None
    for name in RUN_FILES:
        path = run_dir / name
        if path.exists() and not path.is_file():
            raise _run_dir_error(path, "expected a regular file, found a folder or special file")
    for name in RUN_FOLDERS:
        path = run_dir / name
        if path.exists() and not path.is_dir():
            raise _run_dir_error(path, "expected a folder, found a file")
    return run_dir


def _read_json_record(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"invalid run file {path}: not valid JSON ({exc}); restore it, or delete it "
                          "(or the run folder) to start over") from None


def prepare_run_dir(config: RunConfig) -> tuple[Path, bool]:
    """Check the run folder against ``config`` and write config.json; return (folder, whether to resume).

    ``create_run_dir`` must have made the folder. Files that resuming reads (config.json,
    routing.json) are checked here, before any compute.
    """
    run_dir = config.run_dir
    clean_partial_writes(run_dir)
    config_path = run_dir / "config.json"
    new = json.loads(json.dumps(config.to_dict()))
    has_checkpoints = bool(list_checkpoints(run_dir))
    if has_checkpoints and config_path.is_file():
        if not config.checkpoint.resume:
            raise ConfigError(f"invalid checkpoint.resume=False: run folder {run_dir} already contains checkpoints; "
                              "pick another train.run_name, delete the folder, or resume with checkpoint.resume=true")
        saved = _read_json_record(config_path)
        if not isinstance(saved, dict):
            raise ConfigError(f"invalid run file {config_path}: expected a JSON object of config sections; "
                              "restore it, or delete the run folder to start over")
        old = _flat_items(saved)
        for key, value in _flat_items(new).items():
            if key not in RESUMABLE_CHANGES and old.get(key, value) != value:
                raise ConfigError(f"invalid {key}={value!r}: run folder {run_dir} contains a run with {key}="
                                  f"{old.get(key)!r}; resume with the same config or pick another train.run_name")
    if has_checkpoints and (run_dir / "routing.json").is_file():
        _check_routing_record(run_dir / "routing.json")
    atomic_write_text(config_path, json.dumps(new, indent=1))
    return run_dir, has_checkpoints


def _check_routing_record(path: Path) -> None:
    routing = _read_json_record(path)
    history = routing.get("train") if isinstance(routing, dict) else None
    if not (isinstance(history, list)
            and all(isinstance(h, dict) and isinstance(h.get("step"), int) for h in history)):
        raise ConfigError(f"invalid run file {path}: expected an object whose 'train' list holds records with "
                          "a 'step'; restore it, or delete it to restart the routing history")


class RunLock:
    """An exclusive lock on RUN/.lock for as long as one ``aoe train`` process uses the folder.

    The kernel drops a flock when its process ends, even by SIGKILL, so a lock file left behind
    never blocks a later run. The file records the holder's PID for the error message.
    """

    def __init__(self, run_dir: Path):
        import fcntl

        self.path = run_dir / ".lock"
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ConfigError(f"run folder {run_dir} is in use by another aoe train process (PID {holder}); "
                              "wait for it to finish or pick another train.run_name") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        import fcntl

        if not self._file.closed:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()


def _launch_rank() -> int:
    """This process's rank, known before ``init_distributed`` (torchrun sets RANK)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


class _ConsoleHandler(logging.Handler):
    """Log lines on stderr, written through the progress bar once there is one so it is not torn."""

    def __init__(self) -> None:
        super().__init__()
        self.progress_bar = None

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if self.progress_bar is not None:
            self.progress_bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)


def _configure_logging(run_dir: Path) -> tuple[logging.Handler, _ConsoleHandler]:
    file_handler = logging.FileHandler(run_dir / "train.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = _ConsoleHandler()
    log.addHandler(file_handler)
    log.addHandler(console)
    log.setLevel(logging.INFO)
    log.propagate = False
    return file_handler, console


# ----- the loop ----------------------------------------------------------------------------


class _Loop:
    """State of one train() call; split out so that each phase reads as one method."""

    def __init__(self, config: RunConfig, run_dir: Path, device: torch.device, data: DataSources,
                 context: DistributedContext | None = None):
        self.config, self.run_dir, self.device, self.data = config, run_dir, device, data
        torch.manual_seed(config.train.seed)
        self.model = Transformer(config.model).to(device)
        self.model.train()
        # DDP, FSDP2 or expert parallelism; FSDP2 and expert parallelism replace parameters,
        # so the optimizer is built after this.
        context = context or DistributedContext(0, 1, 0, None, device)
        self.parallel = parallelize(self.model, config.parallel, context)
        self.is_main = context.is_main
        self.optimizer = build_optimizer(self.model, config.optim)
        self.step = 0
        self.tokens_seen = 0
        self.wall_time_before = 0.0
        self.routing_total: RoutingSums | None = None
        self.routing_window: RoutingSums | None = None
        self.routing_history: list[dict[str, Any]] = []
        self.last_loss: float | None = None
        self.recent_losses: list[float] = []

    # ----- checkpoint state -----

    def resume(self) -> bool:
        """Load the newest good checkpoint; report it, and every rejected one, in the log.

        A rejected checkpoint is renamed to NAME.rejected by the main process, so that this run
        neither deletes it nor writes over it when it reaches the same step.
        """
        checkpoint, rejected = scan_checkpoints(self.run_dir)
        self.parallel.barrier()  # every rank has chosen before rank 0 renames anything
        if self.is_main:
            for path, reason in rejected:
                log.warning("rejected checkpoint: %s; kept the folder as %s", reason, set_aside(path).name)
        if checkpoint is None:
            if rejected and self.is_main:
                log.warning("NO GOOD CHECKPOINT in %s: rejected %s; training starts again from step 0 "
                            "(the rejected folders are kept as *.rejected)", checkpoint_root(self.run_dir),
                            ", ".join(path.name for path, _ in rejected))
            return False
        try:
            state, tensors = load_any_checkpoint(checkpoint, self.parallel, self.optimizer)
            self.step = state["step"]
            self.tokens_seen = state["tokens_seen"]
            self.wall_time_before = float(state.get("wall_time_s", 0.0))
            self.last_loss = state.get("last_loss")
            resume_loader(self.data.train_loader, state["loader"])
            layers = self.config.model.n_layers
            self.routing_total = routing_from_tensors("routing.total", tensors, layers, self.device)
            self.routing_window = routing_from_tensors("routing.window", tensors, layers, self.device)
        except (KeyError, TypeError, RuntimeError) as exc:
            # Verification checked the files and their structure; what is left is a checkpoint
            # that does not fit this model or loader. The model may be half loaded, so stop.
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot resume from {checkpoint.path}: {first_line}") from None
        if state["micro_step"] != 0:
            raise CheckpointError(f"cannot resume from {checkpoint.path}: it was written inside an optimizer step")
        self.routing_history = [h for h in self._read_routing_history() if h["step"] <= self.step]
        log.info("resumed from %s (step %d, %s tokens seen)", checkpoint.path, self.step, f"{self.tokens_seen:,}")
        return True

    def _read_routing_history(self) -> list[dict[str, Any]]:
        # prepare_run_dir checked the file's structure before any compute.
        path = self.run_dir / "routing.json"
        return json.loads(path.read_text())["train"] if path.is_file() else []

    def save(self, wall_time: float) -> None:
        state = {
            "step": self.step,
            "micro_step": 0,
            "tokens_seen": self.tokens_seen,
            "wall_time_s": wall_time,
            "last_loss": self.last_loss,
            "loader": gather_loader_states(self.parallel, self.data.train_loader.state_dict()),
        }
        tensors = {**routing_to_tensors("routing.total", self.routing_total),
                   **routing_to_tensors("routing.window", self.routing_window)}
        if self.parallel.distributed:
            path = save_distributed_checkpoint(self.run_dir, self.step, self.parallel, self.optimizer, state, tensors,
                                               self.config.checkpoint.keep_last)
        else:
            path = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state, tensors,
                                   self.config.checkpoint.keep_last)
        log.info("saved checkpoint %s", path)

    # ----- one step -----

    def train_step(self, batches: Iterator[Any]) -> StepLoss | None:
        """Run one optimizer step; return None when it had no valid targets and was skipped."""
        config = self.config
        lr = lr_at(self.step, config.optim.lr, config.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [next(batches) for _ in range(config.data.grad_accum_steps)]
        self.tokens_seen += sum(b.input_ids.numel() for b in micro_batches) * self.parallel.world_size

        result = forward_backward(self.parallel.module, micro_batches, config.train.precision)
        if self.parallel.distributed:
            # Every rank logs and decides on the global step: means of the losses, sums of the counts.
            result.loss, result.ce_loss, result.aux_loss = self.parallel.mean_values(
                result.loss, result.ce_loss, result.aux_loss)
            result.num_valid = int(self.parallel.all_reduce_sum(torch.tensor(result.num_valid, device=self.device)))
            result.routing = self.parallel.sum_routing(result.routing)
        step_number = self.step + 1
        if result.num_valid == 0:
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: no valid targets in any micro-batch; skipped the optimizer step", step_number)
            return None
        if not math.isfinite(result.loss):
            raise NonFiniteError(f"non-finite loss {result.loss} at step {step_number} (lr {lr:.3g}); "
                                 f"stopped without saving, the newest checkpoint is from before this step")

        max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
        self.parallel.finish_gradients()
        grad_norm = self.parallel.clip_grad_norm_(max_norm)
        if not math.isfinite(grad_norm):
            raise NonFiniteError(f"non-finite gradient norm {grad_norm} at step {step_number} (loss {result.loss:.4f}); "
                                 f"stopped without saving, the newest checkpoint is from before this step")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        result.grad_norm = grad_norm
        result.lr = lr
        return result


def _log_line(step: int, max_steps: int, result: StepLoss, tokens_per_s: float, mfu: float, mem: float) -> str:
    return (f"step {step}/{max_steps} | loss {result.loss:.4f} | aux {result.aux_loss:.4f} | "
            f"grad norm {result.grad_norm:.3f} | lr {result.lr:.2e} | {tokens_per_s:,.0f} tok/s | "
            f"MFU {100 * mfu:.1f}% | mem {mem:,.0f} MB")


def train(config: RunConfig, data: DataSources | None = None) -> RunResult:
    """Train (or resume) the run that ``config`` describes and return its final metrics.

    ``data`` replaces the prepared data folder (tests pass in-memory loaders); by default the
    folder data.path is checked against the model and opened with ``aoe.data``.
    """
    if data is None:
        check_data(config)
    run_dir = create_run_dir(config)
    # Only the first rank locks: under torchrun every rank of one run shares the folder.
    lock = RunLock(run_dir) if _launch_rank() == 0 else None
    try:
        return _train_locked(config, data)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(config: RunConfig, data: DataSources | None) -> RunResult:
    run_dir, has_checkpoints = prepare_run_dir(config)
    # Under torchrun this joins the process group, and with CUDA picks cuda:LOCAL_RANK.
    context = init_distributed(config.parallel, resolve_device(config.train.device))
    device = context.device

    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    if config.train.num_threads is not None:
        torch.set_num_threads(config.train.num_threads)
    torch.use_deterministic_algorithms(config.train.deterministic, warn_only=True)

    # Only rank 0 reports and writes the run folder's files; the other ranks compute. Logging
    # starts before resuming, so that the resume (or a rejected checkpoint) is reported.
    handlers = _configure_logging(run_dir) if context.is_main else ()
    metrics_log = None
    bar = None
    try:
        data = data if data is not None else open_data(config, context.rank, context.world_size)
        loop = _Loop(config, run_dir, device, data, context)
        if has_checkpoints and config.checkpoint.resume:
            loop.resume()

        from tqdm.auto import tqdm

        bar = tqdm(total=config.schedule.max_steps, initial=loop.step,
                   disable=not (config.train.progress and context.is_main),
                   desc=config.name, unit="step", dynamic_ncols=True, file=sys.stderr)
        if handlers and config.train.progress:
            handlers[1].progress_bar = bar
        metrics_log = MetricsLog(run_dir, loop.step, config.train.tensorboard, final_step=config.schedule.max_steps) if context.is_main else _NoMetricsLog()
        result = _run_loop(loop, metrics_log, bar)
        return result
    finally:
        if bar is not None:
            bar.close()
        if metrics_log is not None:
            metrics_log.close()
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)
        close_distributed(context)


class _NoMetricsLog:
    """The metrics log of ranks other than 0, which write nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _run_loop(loop: _Loop, metrics_log: MetricsLog, bar) -> RunResult:
    config, device, model = loop.config, loop.device, loop.model
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
    peak = config.train.peak_flops or peak_flops(loop.run_dir, device, dtype, torch.get_num_threads())
    flops_per_token = config.model.train_flops_per_token(config.data.seq_len)
    log.info("run %s: %s total / %s active parameters, %.3g train FLOPs/token, measured peak %.1f GFLOP/s (%s, %s)",
             loop.run_dir, f"{config.model.num_params():,}", f"{config.model.num_active_params():,}",
             flops_per_token, peak / 1e9, device, str(dtype).replace("torch.", ""))

    if not loop.data.val_batches:
        log.warning("validation is off (train.eval_batches=0 or an empty validation split): "
                    "no val loss, and summary.json has val_loss null")
    start_time = time.perf_counter()
    window_time, window_tokens = 0.0, 0
    session_tokens, session_train_time = 0, 0.0
    batches = iter(loop.data.train_loader)
    max_steps = config.schedule.max_steps
    interval = config.checkpoint.interval

    while loop.step < max_steps:
        step_start = time.perf_counter()
        tokens_before = loop.tokens_seen
        result = loop.train_step(batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - step_start
        loop.step += 1
        bar.update(1)
        step_tokens = loop.tokens_seen - tokens_before
        window_time += elapsed
        window_tokens += step_tokens
        session_tokens += step_tokens
        session_train_time += elapsed

        if result is not None:
            loop.last_loss = result.loss
            loop.routing_total = merge_routing(loop.routing_total, result.routing)
            loop.routing_window = merge_routing(loop.routing_window, result.routing)
            record = {"kind": "train", "step": loop.step, "loss": result.loss, "ce_loss": result.ce_loss,
                      "aux_loss": result.aux_loss, "grad_norm": result.grad_norm, "lr": result.lr,
                      "tokens": loop.tokens_seen, "valid_targets": result.num_valid}
            if loop.step % config.train.log_interval == 0 or loop.step == max_steps:
                tokens_per_s = window_tokens / max(window_time, 1e-9)
                mfu = flops_per_token * tokens_per_s / peak
                mem = memory_mb(device)
                record.update(tokens_per_s=tokens_per_s, mfu=mfu, mem_mb=mem)
                log.info(_log_line(loop.step, max_steps, result, tokens_per_s, mfu, mem))
                window_time, window_tokens = 0.0, 0
            metrics_log.write(record)
        else:
            metrics_log.write({"kind": "train", "step": loop.step, "loss": None, "skipped": True,
                               "tokens": loop.tokens_seen})

        if loop.step % config.train.eval_interval == 0 and loop.step < max_steps:
            _evaluate_and_record(loop, metrics_log)
        if interval and loop.step % interval == 0 and loop.step < max_steps:
            loop.save(loop.wall_time_before + time.perf_counter() - start_time)

    val_metrics, val_routing = _evaluate_and_record(loop, metrics_log, final=True)
    wall_time = loop.wall_time_before + time.perf_counter() - start_time
    if config.checkpoint.save_final and not _has_checkpoint(loop.run_dir, loop.step):
        loop.save(wall_time)

    tokens_per_s = session_tokens / session_train_time if session_train_time > 0 else None
    summary = _summary(loop, val_metrics, val_routing, wall_time, tokens_per_s, peak, flops_per_token)
    if loop.is_main:
        atomic_write_text(loop.run_dir / "summary.json", json.dumps(summary, indent=1))
        write_report(loop.run_dir, summary)
    log.info("finished %s: final train loss %s, val loss %s, val ppl %s", config.name,
             _maybe(summary["final_train_loss"]), _maybe(summary["val_loss"]), _maybe(summary["val_ppl"]))
    return RunResult(loop.run_dir, summary)


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _has_checkpoint(run_dir: Path, step: int) -> bool:
    return any(s == step for s, _ in list_checkpoints(run_dir))


def _evaluate_and_record(loop: _Loop, metrics_log: MetricsLog, final: bool = False) -> tuple[dict[str, float], RoutingSums]:
    """Evaluate on the validation batches, close the routing window and rewrite routing.json."""
    val_metrics: dict[str, float] = {}
    val_routing: RoutingSums = []
    if loop.data.val_batches:
        val_metrics, val_routing = evaluate(loop.model, loop.data.val_batches, loop.config.train.precision)
        metrics_log.write({"kind": "val", "step": loop.step, **val_metrics})
        log.info("step %d: val loss %.4f | val ppl %.2f", loop.step, val_metrics["val_loss"], val_metrics["val_ppl"])
    if loop.routing_window is not None and not (final and loop.routing_history
                                                and loop.routing_history[-1]["step"] == loop.step):
        loop.routing_history.append({"step": loop.step, "layers": routing_summary(loop.routing_window)})
        loop.routing_window = None
    routing = {"train": loop.routing_history}
    if final:
        routing["val_final"] = {"step": loop.step, "layers": routing_summary(val_routing)}
    if loop.is_main:
        atomic_write_text(loop.run_dir / "routing.json", json.dumps(routing, indent=1))
    return val_metrics, val_routing


def _summary(loop: _Loop, val_metrics: dict[str, float], val_routing: RoutingSums, wall_time: float,
             tokens_per_s: float | None, peak: float, flops_per_token: int) -> dict[str, Any]:
    config = loop.config
    train_layers = routing_summary(loop.routing_total)
    sparse = [layer for layer in train_layers if layer is not None]
    return {
        "name": config.name,
        "model_kind": config.model.ffn.kind,
        "total_params": config.model.num_params(),
        "active_params": config.model.num_active_params(),
        "built_params": loop.model.num_params(),
        "steps": loop.step,
        "tokens_seen": loop.tokens_seen,
        "wall_time_s": wall_time,
        "tokens_per_s": tokens_per_s,
        "peak_flops": peak,
        "train_flops_per_token": flops_per_token,
        "mfu": None if tokens_per_s is None else flops_per_token * tokens_per_s / peak,
        "final_train_loss": loop.last_loss,
        "val_loss": val_metrics.get("val_loss"),
        "val_ppl": val_metrics.get("val_ppl"),
        "ent_load": [layer["ent_load"] for layer in sparse],
        "ent_conf": [layer["ent_conf"] for layer in sparse],
        "mean_active_experts": (sum(layer["mean_active_experts"] for layer in sparse) / len(sparse)) if sparse else None,
        "mean_score": [layer["mean_score"] for layer in sparse],
        "routing_train": train_layers,
        "routing_val": routing_summary(val_routing),
    }
