"""Multi-process training under torchrun: data parallelism (DDP), FSDP2 and expert parallelism.

``init_distributed`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the
process group; ``parallelize`` wraps a ``Transformer`` for the chosen mode and returns a
``Parallelism``, the one object the training loop talks to for everything that differs between
modes: the module to call, gradient synchronisation, the global gradient norm, metric
reduction and checkpoints. With one process every mode degrades to plain training.

Modes (``ParallelConfig.mode``):
- ``none``: one process.
- ``ddp``: every rank holds the whole model; DistributedDataParallel averages gradients.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter, gradient and
  optimizer state along dim 0; each transformer block is one unit, gathered for its forward.
- ``ep``: expert parallelism (``aoe.layers.expert_parallel``). The experts of every MoE/AoE
  layer are split across the ranks and tokens travel to their experts by all-to-all; the other
  weights, AoE's W_down and the router included, are replicated, and their gradients are
  all-reduced after the backward pass (``finish_gradients``).

Loss convention: every mode differentiates the MEAN over ranks of the per-rank losses, so with
equal valid-target counts per rank the gradient equals that of one process on the global batch.
The load-balancing loss takes f_i and P_i over the global batch (``SparseFFN.balance_group``),
so the mean of the ranks' losses equals the single-process loss.

Checkpoints of multi-process runs use torch.distributed.checkpoint (DCP): every tensor is stored
with its global shape, so a run saved at one world size or mode resumes at another, including
one process.

NOTE: expert-choice selection picks each expert's tokens among the tokens of its own rank, so
with more than one rank it routes differently from one process on the global batch. Top-K
and top-P selection are per token and match exactly.
TODO: DDP and FSDP2 communicate after every micro-batch of a gradient-accumulation step
(correct, but no_sync / set_requires_gradient_sync would save the traffic), and expert
parallelism all-reduces the replicated gradients after the backward pass without overlap.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from aoe.config_utils import check, check_choice
from aoe.layers.expert_parallel import shard_experts, sharded_expert_params
from aoe.layers.routing import RoutingStats

log = logging.getLogger(__name__)

PARALLEL_MODES = ("none", "ddp", "fsdp", "ep")
BACKENDS = ("auto", "nccl", "gloo")
# Sub-folder of a checkpoint that contains the DCP files of a multi-process run.
DCP_DIR = "dcp"


@dataclass
class ParallelConfig:
    """The split of a run over the processes that torchrun starts."""

    # none | ddp | fsdp | ep (expert parallelism; ffn.n_experts must be a multiple of the world size)
    mode: str = "none"
    # auto picks nccl when train.device is CUDA and gloo otherwise.
    backend: str = "auto"
    # FSDP2: free the gathered parameters of a block after its forward and gather them again
    # for the backward (less memory, one more all-gather per block).
    reshard_after_forward: bool = True
    # Seconds a collective may wait for the other ranks before the run fails.
    timeout_s: int = 1800

    def __post_init__(self) -> None:
        check_choice("parallel.mode", self.mode, PARALLEL_MODES)
        check_choice("parallel.backend", self.backend, BACKENDS)
        check(isinstance(self.timeout_s, int) and self.timeout_s >= 1, "parallel.timeout_s", self.timeout_s,
              "expected a positive number of seconds")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job; world_size 1 and backend None for a single process."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device
    # Whether init_distributed started the process group (and close_distributed ends it).
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"invalid environment variable {name}={value!r}: expected an integer (torchrun sets it)") from None


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"invalid parallel.backend='nccl' on device {device}: NCCL needs CUDA; use 'gloo' or 'auto'")
    return backend


def init_distributed(parallel: ParallelConfig, device: torch.device | str = "cpu") -> DistributedContext:
    """Start the process group that torchrun describes in the environment, or describe a single process.

    ``device`` is the training device type; with CUDA every process takes cuda:LOCAL_RANK. A
    process group that the caller started already is used as it is.
    """
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
    if world_size > 1 and parallel.mode == "none":
        raise ValueError(f"invalid parallel.mode='none' with WORLD_SIZE={world_size}: every process would train "
                         f"alone; set parallel.mode to 'ddp', 'fsdp' or 'ep'")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistributedContext(0, 1, 0, None, device)

    if dist.is_initialized():
        return DistributedContext(rank, world_size, local_rank, dist.get_backend(), device)
    backend = resolve_backend(parallel.backend, device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=parallel.timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return DistributedContext(rank, world_size, local_rank, backend, device, owns_group=True)


def close_distributed(context: DistributedContext) -> None:
    """End the process group if ``init_distributed`` started it."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ----- wrapping ----------------------------------------------------------------------------


def _broadcast_from_rank0(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank, so that all ranks start alike."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def _set_balance_group(model: nn.Module, group) -> None:
    from aoe.layers.moe import SparseFFN

    for module in model.modules():
        if isinstance(module, SparseFFN):
            module.balance_group = group


def parallelize(model: nn.Module, parallel: ParallelConfig, context: DistributedContext) -> "Parallelism":
    """Wrap ``model`` (already on ``context.device``) for ``parallel.mode``; build the optimizer afterwards.

    The optimizer must be built from ``Parallelism.model.parameters()`` after this call,
    because FSDP2 and expert parallelism replace parameters.
    """
    if not context.distributed:
        return Parallelism(model, model, "none", context)
    mode = parallel.mode
    _broadcast_from_rank0(model)
    _set_balance_group(model, dist.group.WORLD)

    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.device.index] if context.device.type == "cuda" else None
        return Parallelism(model, DistributedDataParallel(model, device_ids=device_ids), mode, context)

    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(context.device.type, (context.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh, reshard_after_forward=parallel.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=parallel.reshard_after_forward)
        return Parallelism(model, model, mode, context)

    if mode == "ep":
        shard_experts(model)
        return Parallelism(model, model, mode, context)
    raise ValueError(f"invalid parallel.mode={mode!r}: expected one of {PARALLEL_MODES}")


class Parallelism:
    """The training loop's single interface to process groups and parallel wrappers.

    ``module`` is what to call for the forward pass; ``model`` is the underlying Transformer
    (parameters, state dicts, config). Every method is a collective in a multi-process run:
    all ranks must call it, in the same order.
    """

    def __init__(self, model: nn.Module, module: nn.Module, mode: str, context: DistributedContext):
        self.model, self.module, self.mode, self.context = model, module, mode, context
        # qualified name -> (parameter, expert axis, bank) of expert parallelism's sharded weights
        self.expert_params = sharded_expert_params(model) if mode == "ep" else {}

    @property
    def distributed(self) -> bool:
        return self.context.distributed

    @property
    def world_size(self) -> int:
        return self.context.world_size

    # ----- gradients -----

    def finish_gradients(self) -> None:
        """Make every gradient the rank-mean gradient; call after the last backward of a step.

        DDP and FSDP2 already did this during the backward. Expert parallelism sums the
        replicated weights' gradients over the ranks and divides every gradient by the world
        size: an expert shard's gradient already contains every rank's tokens, through the
        all-to-all's backward.
        """
        if self.mode != "ep":
            return
        sharded = {id(param) for param, _, _ in self.expert_params.values()}
        replicated = [p for p in self.model.parameters() if id(p) not in sharded and p.grad is not None]
        if replicated:
            # shape: (sum of sizes,) one collective for all replicated gradients
            flat = torch.cat([p.grad.reshape(-1) for p in replicated])
            dist.all_reduce(flat)
            for param, chunk in zip(replicated, torch.split(flat, [p.numel() for p in replicated])):
                param.grad.copy_(chunk.view_as(param.grad))
        scale = 1.0 / self.world_size
        # NOTE: experts that received no rows still have a (zero) gradient, because
        # ExpertParallelBank ties its empty output to the weights; AdamW would otherwise skip
        # their moments and weight decay, unlike a single process.
        for param, _, _ in self.expert_params.values():
            if param.grad is not None:
                param.grad.mul_(scale)
        for param in replicated:
            param.grad.mul_(scale)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the global gradient norm of the whole model to ``max_norm``; return the norm before clipping.

        The same formula as ``torch.nn.utils.clip_grad_norm_``: coefficient
        max_norm / (norm + 1e-6), capped at 1.
        """
        if self.mode in ("none", "ddp"):
            return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        from torch.distributed.tensor import DTensor

        sharded_ids = {id(param) for param, _, _ in self.expert_params.values()}
        device = self.context.device
        # shape: (2,) squared norms of the sharded parts (summed over ranks) and the replicated ones
        squares = torch.zeros(2, dtype=torch.float64, device=device)
        grads = []
        for param in self.model.parameters():
            if param.grad is None:
                continue
            grad = param.grad
            grads.append(grad)
            if isinstance(grad, DTensor):
                # FSDP2 gradients are Shard(0): each rank holds a disjoint block.
                squares[0] += grad.to_local().double().pow(2).sum()
            elif id(param) in sharded_ids:
                squares[0] += grad.double().pow(2).sum()
            else:
                squares[1] += grad.double().pow(2).sum()
        sharded_sum = squares[:1].clone()
        dist.all_reduce(sharded_sum)
        total_norm = float((sharded_sum[0] + squares[1]).sqrt())
        coefficient = min(max_norm / (total_norm + 1e-6), 1.0)
        if coefficient < 1.0:
            for grad in grads:
                grad.mul_(coefficient)
        return total_norm

    # ----- metrics -----

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the ranks, in place; a no-op for one process."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def mean(self, value: float) -> float:
        """Mean of a Python number over the ranks."""
        if not self.distributed:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.context.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def mean_values(self, *values: float) -> list[float]:
        """Means over the ranks of several Python numbers, in one collective."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.context.device)
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def sum_routing(self, routing: list[RoutingStats | None]) -> list[RoutingStats | None]:
        """Per-layer routing counters summed over the ranks, in one collective (they are sums, so they add)."""
        if not self.distributed or not routing:
            return routing
        tensors = [t for stats in routing if stats is not None for t in stats.as_tuple()]
        if not tensors:
            return routing
        # shape: (total elements,) float64 represents the integer counts exactly
        flat = torch.cat([t.reshape(-1).double() for t in tensors])
        dist.all_reduce(flat)
        chunks = iter(torch.split(flat, [t.numel() for t in tensors]))
        summed: list[RoutingStats | None] = []
        for stats in routing:
            if stats is None:
                summed.append(None)
                continue
            summed.append(RoutingStats(*(next(chunks).view_as(t).to(t.dtype) for t in stats.as_tuple())))
        return summed

    def gather_objects(self, value: Any) -> list[Any]:
        """Gather every rank's ``value`` in rank order (picklable objects only)."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ----- state -----

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gather the whole model's state dict, as a single-process ``Transformer.state_dict()``, on the CPU.

        Rank 0 always receives it. Under FSDP2 the other ranks receive an empty dict, because
        the gathered tensors are offloaded to rank 0's CPU memory only.
        """
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(self.model, options=options)
            return {name: tensor.detach().cpu() for name, tensor in state.items()}
        state = {name: tensor.detach() for name, tensor in self.model.state_dict().items()}
        for name, (param, dim, bank) in self.expert_params.items():
            blocks = [torch.empty_like(param) for _ in range(self.world_size)]
            dist.all_gather(blocks, param.detach().contiguous())
            state[name] = torch.cat(blocks, dim=dim)
        return {name: tensor.cpu() for name, tensor in state.items()}

    def dcp_state(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Model (and optimizer) state keyed by parameter name, each tensor with its global shape."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state: dict[str, Any] = {"model": get_model_state_dict(self.module)}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(self.module, optimizer)
        if self.expert_params:
            _wrap_expert_shards(state, self.expert_params, self.context)
        return state

    def load_dcp_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> None:
        """Copy a state filled by ``torch.distributed.checkpoint.load`` into the model and optimizer."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if self.expert_params:
            state = _unwrap_expert_shards(state)
        set_model_state_dict(self.module, state["model"])
        if optimizer is not None and "optimizer" in state:
            set_optimizer_state_dict(self.module, optimizer, state["optimizer"])


def _expert_dtensor(local: torch.Tensor, dim: int, context: DistributedContext):
    """View this rank's block of experts as the DTensor of the whole expert axis, for DCP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh(context.device.type, (context.world_size,))
    shape = list(local.shape)
    shape[dim] *= context.world_size
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=stride)


def _wrap_expert_shards(state: dict[str, Any], expert_params: dict, context: DistributedContext) -> None:
    # New dicts throughout: the optimizer's state dict shares its per-parameter dicts with the
    # optimizer, which must keep plain tensors.
    state["model"] = dict(state["model"])
    optim_state = state.get("optimizer", {}).get("state")
    if optim_state is not None:
        state["optimizer"] = {**state["optimizer"], "state": dict(optim_state)}
    for name, (param, dim, _) in expert_params.items():
        state["model"][name] = _expert_dtensor(state["model"][name], dim, context)
        if optim_state is None or name not in optim_state:
            continue
        # Moments have the parameter's shape; scalars such as AdamW's step are replicated.
        state["optimizer"]["state"][name] = {
            key: _expert_dtensor(value, dim, context) if isinstance(value, torch.Tensor) and value.shape == param.shape
            else value
            for key, value in optim_state[name].items()
        }


def _unwrap_expert_shards(state: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    def unwrap(value):
        if isinstance(value, DTensor):
            return value.to_local()
        if isinstance(value, dict):
            return {key: unwrap(item) for key, item in value.items()}
        if isinstance(value, list):
            return [unwrap(item) for item in value]
        return value

    return unwrap(state)


# ----- DCP checkpoints ---------------------------------------------------------------------


def save_dcp(directory: str | Path, parallel: Parallelism, optimizer: torch.optim.Optimizer | None) -> None:
    """Write the model and optimizer with torch.distributed.checkpoint into ``directory`` (all ranks call this)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(parallel.dcp_state(optimizer), checkpoint_id=str(directory), no_dist=not parallel.distributed)


def load_dcp(directory: str | Path, parallel: Parallelism, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a DCP checkpoint written at any world size and mode into this run's model and optimizer."""
    import torch.distributed.checkpoint as dcp

    state = parallel.dcp_state(optimizer)
    with warnings.catch_warnings():
        # DCP warns whenever it loads without a process group, which is intended here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory), no_dist=not parallel.distributed)
    parallel.load_dcp_state(state, optimizer)


# ----- the trainer's checkpoint layout -----------------------------------------------------


def save_distributed_checkpoint(run_dir: str | Path, step: int, parallel: Parallelism, optimizer: torch.optim.Optimizer,
                                state: dict[str, Any], state_tensors: dict[str, torch.Tensor], keep_last: int) -> Path:
    """Write checkpoint ``step`` of a multi-process run in the layout of ``aoe.train.checkpoint``; all ranks call this.

    The model and optimizer go to DCP files under dcp/, which any world size can load.
    model.safetensors still contains the whole model (gathered), so ``load_model`` and the
    evaluation tools read it like any checkpoint. optimizer.json records that the optimizer
    state is in dcp/. The folder appears under its final name only when complete.
    """
    from aoe.train import checkpoint as ckpt

    root = ckpt.checkpoint_root(run_dir)
    final = root / ckpt.step_dir_name(step)
    # Every rank writes its DCP shard into the same temporary folder, named by rank 0.
    names = [f".tmp-{final.name}-{os.getpid()}"]
    if parallel.distributed:
        dist.broadcast_object_list(names, src=0)
    tmp = root / names[0]
    if parallel.context.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    parallel.barrier()

    save_dcp(tmp / DCP_DIR, parallel, optimizer)
    full_model = parallel.full_state_dict()
    if parallel.context.is_main:
        rng_json, rng_tensors = ckpt.rng_state()
        ckpt._save_tensors(tmp / ckpt.MODEL_FILE, full_model)
        ckpt._save_tensors(tmp / ckpt.OPTIMIZER_TENSORS, {})
        ckpt._write_json(tmp / ckpt.OPTIMIZER_JSON, {"format": "dcp", "path": DCP_DIR,
                                                     "world_size": parallel.world_size, "mode": parallel.mode})
        ckpt._save_tensors(tmp / ckpt.STATE_TENSORS, {**state_tensors, **rng_tensors})
        ckpt._write_json(tmp / ckpt.STATE_JSON, {**state, "step": step, "rng": rng_json})
        names = [*ckpt.REQUIRED_FILES, *sorted(str(p.relative_to(tmp)) for p in (tmp / DCP_DIR).rglob("*") if p.is_file())]
        files = {name: {"sha256": ckpt.sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in names}
        ckpt._write_json(tmp / ckpt.MANIFEST, {"format": ckpt.FORMAT_VERSION, "step": step, "files": files})
        for folder in (tmp / DCP_DIR, tmp):
            ckpt._fsync_dir(folder)
        ckpt.install_checkpoint(tmp, final)
        ckpt.prune_checkpoints(run_dir, keep_last)
    parallel.barrier()
    return final


def is_dcp_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def load_any_checkpoint(checkpoint, parallel: Parallelism, optimizer: torch.optim.Optimizer | None,
                        restore_rng: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a single-process or a DCP checkpoint into this run, whatever its world size; return the trainer state.

    Same return value as ``aoe.train.checkpoint.load_checkpoint``.
    """
    from safetensors.torch import load_file

    from aoe.train import checkpoint as ckpt

    path = Path(checkpoint.path)
    if not is_dcp_checkpoint(path):
        if parallel.mode in ("none", "ddp"):
            return ckpt.load_checkpoint(checkpoint, parallel.model, optimizer, restore_rng)
        _load_single_process_into_shards(path, parallel, optimizer)
    else:
        load_dcp(path / DCP_DIR, parallel, optimizer)
    state = json.loads((path / ckpt.STATE_JSON).read_text())
    state_tensors = load_file(str(path / ckpt.STATE_TENSORS))
    if restore_rng:
        ckpt.set_rng_state(state["rng"], state_tensors)
    return state, {key: value for key, value in state_tensors.items() if not key.startswith("rng.")}


def _load_single_process_into_shards(path: Path, parallel: Parallelism, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a single-process checkpoint (whole tensors, optimizer state keyed by index) into FSDP2 or expert shards.

    The saved optimizer numbers parameters in the order of its param groups. FSDP2 and expert
    parallelism keep every module's parameter order, so the same optimizer construction gives
    the same numbering, which maps the saved indices to parameter names.
    """
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from aoe.train import checkpoint as ckpt

    model_state = load_file(str(path / ckpt.MODEL_FILE))
    optim_state = None
    if optimizer is not None:
        saved = ckpt.unflatten_optimizer(load_file(str(path / ckpt.OPTIMIZER_TENSORS)),
                                         json.loads((path / ckpt.OPTIMIZER_JSON).read_text()))
        names = {id(param): name for name, param in parallel.model.named_parameters()}
        ordered = [names[id(param)] for group in optimizer.param_groups for param in group["params"]]
        optim_state = {
            "state": {ordered[index]: dict(entry) for index, entry in saved["state"].items()},
            "param_groups": [{**group, "params": [ordered[i] for i in group["params"]]} for group in saved["param_groups"]],
        }

    if parallel.mode == "fsdp":
        # Every rank holds the whole state; torch keeps each rank's shard of it.
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(parallel.module, model_state, options=options)
        if optim_state is not None:
            set_optimizer_state_dict(parallel.module, optimizer, optim_state, options=options)
        return

    rank = parallel.context.rank
    for name, (param, dim, _) in parallel.expert_params.items():
        size = param.shape[dim]
        full_shape = model_state[name].shape
        model_state[name] = model_state[name].narrow(dim, rank * size, size).contiguous()
        entry = optim_state["state"].get(name, {}) if optim_state is not None else {}
        for key, value in entry.items():
            # Moments have the parameter's shape; scalars such as AdamW's step are replicated.
            if isinstance(value, torch.Tensor) and value.shape == full_shape:
                entry[key] = value.narrow(dim, rank * size, size).contiguous()
    set_model_state_dict(parallel.module, model_state)
    if optim_state is not None:
        set_optimizer_state_dict(parallel.module, optimizer, optim_state)


# ----- data-loader state -------------------------------------------------------------------


def gather_loader_states(parallel: Parallelism, loader_state: dict[str, Any]) -> dict[str, Any]:
    """Gather every rank's loader state for the checkpoint: rank 0's fields plus the list of all ranks'."""
    return {**loader_state, "ranks": parallel.gather_objects(loader_state)}


def resume_loader(loader, saved: dict[str, Any]) -> None:
    """Continue ``loader`` (an ``aoe.data.loader.PackedLoader``) from a checkpoint's loader state.

    At the world size and batch size of the save, each rank takes its own state, so the run
    repeats exactly. Otherwise the run continues from the same place in the epoch's window order.
    PackedLoader's step b at world size W and batch size B covers positions [b*B*W, (b+1)*B*W)
    of that order across the ranks, which converts the saved position to the new W and B. The
    global batch is then B*W of the new run, and no window is repeated or skipped within the epoch.
    """
    per_rank = saved.get("ranks") or [saved]
    rank, world_size = getattr(loader, "rank", 0), getattr(loader, "world_size", 1)
    if len(per_rank) == world_size and per_rank[0].get("batch_size") == getattr(loader, "batch_size", None):
        loader.load_state_dict(per_rank[rank])
        return
    if len(per_rank) == world_size == 1:
        # A loader without PackedLoader's fields (a test stand-in) resumes from its own state.
        loader.load_state_dict(per_rank[0])
        return

    state = dict(per_rank[0])
    position = state["batch_in_epoch"] * state["batch_size"] * state["world_size"]
    windows_per_step = loader.batch_size * loader.world_size
    if position % windows_per_step != 0:
        raise ValueError(
            f"cannot resume the data order: the checkpoint is {position} windows into epoch {state['epoch']}, "
            f"which is not a whole number of steps of {windows_per_step} windows (batch size {loader.batch_size} "
            f"x world size {loader.world_size}); resume with a batch size and world size whose product divides {position}")
    batch_in_epoch = position // windows_per_step
    epoch = state["epoch"]
    if batch_in_epoch >= loader.batches_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0
    state.update(rank=loader.rank, world_size=loader.world_size, batch_size=loader.batch_size,
                 epoch=epoch, batch_in_epoch=batch_in_epoch)
    state.pop("ranks", None)
    log.warning("resuming the data order saved at world size %d, batch size %d with world size %d, batch size %d: "
                "epoch %d, step %d of the epoch", len(per_rank), per_rank[0]["batch_size"], loader.world_size,
                loader.batch_size, epoch, batch_in_epoch)
    loader.load_state_dict(state)
