"""The benchmark suite behind ``aoe bench``: what it runs, in which groups, and what it returns.

Each group is timed round-robin (see ``aoe.bench.measure``), and every ratio the targets use is
taken between cases of one group, so that load from other processes on the machine affects
both sides of the ratio alike. The dense matmul peak of each dtype is one of the cases of the
group it normalises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from aoe.bench.cases import (
    LayerShape,
    batched_mm_bytes,
    build_layer,
    layer_case,
    layer_inputs,
    mixtral_block_from,
    mixtral_implementations,
    model_case,
)
from aoe.bench.measure import Case, matmul_case, memory_meter, time_interleaved
from aoe.model.presets import paper_732m

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# transformers experts implementations whose CUDA kernels transformers downloads from the
# Hugging Face Hub at first use; the benchmark reaches no network, so it leaves them out.
HUB_KERNEL_IMPLEMENTATIONS = {"deepgemm", "sonicmoe"}


@dataclass
class Plan:
    """Shapes and sizes of one benchmark run."""

    d_model: int = 768
    d_ffn: int = 3072
    n_experts: int = 8
    top_k: int = 2
    d_lows: tuple[int, ...] = (64, 128, 256, 512)
    tokens: dict[str, int] = field(default_factory=lambda: {"fp32": 512, "bf16": 16})
    peak_size: dict[str, int] = field(default_factory=lambda: {"fp32": 1024, "bf16": 512})
    # Whole model: the 732M model of the AoE paper (Lv et al., 2025), cut to a few layers and a
    # smaller vocabulary.
    model_layers: int = 2
    model_heads: int = 12
    model_vocab: int = 8192
    model_batch: int = 1
    model_seq: dict[str, int] = field(default_factory=lambda: {"fp32": 128, "bf16": 16})
    # Scaling sweeps at a CPU-sized layer.
    scale_d_model: int = 256
    scale_d_ffn: int = 1024
    scale_d_low: int = 86
    scale_tokens: tuple[int, ...] = (256, 1024, 2048)
    scale_experts: tuple[int, ...] = (8, 16, 32, 64)
    scale_top_k: tuple[int, ...] = (1, 2, 4, 8)
    scale_base_tokens: int = 1024
    scale_dtype: str = "fp32"
    repeats: int = 2
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    batched_mm_limit_bytes: int = 512 * 1024**2
    device: str = "cpu"

    @classmethod
    def quick(cls) -> "Plan":
        """Tiny shapes that exercise every code path in seconds (tests, smoke runs)."""
        return cls(d_model=64, d_ffn=128, n_experts=4, top_k=2, d_lows=(16, 32),
                   tokens={"fp32": 64, "bf16": 16}, peak_size={"fp32": 128, "bf16": 64},
                   model_layers=1, model_heads=4, model_vocab=256, model_seq={"fp32": 32, "bf16": 16},
                   scale_d_model=32, scale_d_ffn=64, scale_d_low=11, scale_tokens=(32, 64),
                   scale_experts=(4, 8), scale_top_k=(1, 2), scale_base_tokens=32, repeats=1)

    @classmethod
    def gpu(cls) -> "Plan":
        """Sizes for one large GPU: paper-sized token batches, the full 12-layer small model."""
        return cls(tokens={"fp32": 8192, "bf16": 16384}, peak_size={"fp32": 8192, "bf16": 8192},
                   model_layers=12, model_vocab=32000, model_batch=2, model_seq={"fp32": 512, "bf16": 2048},
                   scale_tokens=(4096, 16384, 65536), scale_base_tokens=16384, scale_dtype="bf16", repeats=10,
                   batched_mm_limit_bytes=16 * 1024**3, device="cuda")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def layer_shape(self, dtype_name: str, d_low: int | None = None) -> LayerShape:
        return LayerShape(self.d_model, self.d_ffn, self.n_experts, self.top_k, self.tokens[dtype_name], d_low)


@dataclass
class Row:
    """One measured case, in plain numbers for the report."""

    name: str
    seconds: float
    tokens_per_s: float
    flops_per_s: float
    peak_bytes: int | None = None
    flop_ratio: float | None = None  # MoE FLOPs / this case's FLOPs, for the matched-parameter sweep
    max_abs_diff: float | None = None  # against our MoE layer's output, for transformers' blocks
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Results:
    plan: Plan
    peak: dict[str, dict[str, float]] = field(default_factory=dict)  # dtype -> layout -> FLOP/s
    sweep: dict[str, list[Row]] = field(default_factory=dict)  # dtype -> MoE, AoE rows
    transformers: dict[str, list[Row]] = field(default_factory=dict)  # dtype -> rows (ours first)
    model: dict[str, list[Row]] = field(default_factory=dict)  # dtype -> MoE, AoE rows
    scaling: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def peak_flops(self, dtype_name: str) -> float:
        return max(self.peak[dtype_name].values())


def _row(case: Case, **kwargs) -> Row:
    return Row(case.name, case.seconds, case.tokens_per_s, case.flops_per_s, **kwargs)


def _run_with_memory(cases: list[Case], repeats: int, desc: str, device: torch.device) -> dict[str, int]:
    """Time ``cases`` round-robin; the last repeat also measures each case's peak memory."""
    return time_interleaved(cases, repeats, desc, meter=lambda: memory_meter(device))


def run_layer_group(plan: Plan, dtype_name: str, results: Results) -> None:
    """MoE, AoE at every d_low, transformers' Mixtral block and the matmul peak, in one timed group."""
    dtype, device = DTYPES[dtype_name], plan.torch_device
    moe_shape = plan.layer_shape(dtype_name)
    x, direction = layer_inputs(moe_shape, dtype, device=device)
    cases: list[Case] = [matmul_case(dtype, plan.peak_size[dtype_name], layout, device) for layout in ("nn", "nt")]

    moe = build_layer(moe_shape, dtype, device=device)
    cases.append(layer_case("MoE", moe, x, direction, moe_shape.train_flops()))
    flop_ratio = {"MoE": 1.0}
    for d_low in plan.d_lows:
        shape = plan.layer_shape(dtype_name, d_low)
        cases.append(layer_case(shape.label(), build_layer(shape, dtype, device=device), x, direction,
                                shape.train_flops()))
        flop_ratio[shape.label()] = moe_shape.train_flops() / shape.train_flops()

    # Our layer's output is the reference every transformers block must reproduce.
    with torch.no_grad():
        reference = moe(x)[0].float()
    diffs = {}
    for implementation in mixtral_implementations():
        label = f"transformers {implementation}"
        if implementation in HUB_KERNEL_IMPLEMENTATIONS:
            results.skipped.append(f"{label} ({dtype_name}): needs CUDA kernels downloaded from the Hugging Face Hub")
            continue
        if implementation == "batched_mm" and batched_mm_bytes(moe_shape, dtype) > plan.batched_mm_limit_bytes:
            gib = batched_mm_bytes(moe_shape, dtype) / 1024**3
            results.skipped.append(f"{label} ({dtype_name}): copies one (3*d_ffn, d_model) weight per "
                                   f"(token, expert), {gib:.1f} GiB at {moe_shape.tokens} tokens")
            continue
        block = mixtral_block_from(moe, implementation)
        try:
            with torch.no_grad():
                diffs[label] = float((block(x[None])[0].float() - reference).abs().max())
        except Exception as exc:  # noqa: BLE001 - an optional kernel that fails to load is reported, not fatal
            results.skipped.append(f"{label} ({dtype_name}): failed with {type(exc).__name__}: {exc}")
            continue
        cases.append(layer_case(label, block, x[None], direction[None], moe_shape.train_flops()))

    peaks = _run_with_memory(cases, plan.repeats, f"layers {dtype_name}", device)
    results.peak[dtype_name] = {case.name.split()[-1]: case.flops_per_s for case in cases[:2]}
    by_name = {case.name: case for case in cases}
    results.sweep[dtype_name] = [_row(by_name[name], peak_bytes=peaks[name], flop_ratio=ratio)
                                 for name, ratio in flop_ratio.items()]
    results.transformers[dtype_name] = [_row(by_name["MoE"], peak_bytes=peaks["MoE"], note="ours")] + [
        _row(by_name[label], peak_bytes=peaks[label], max_abs_diff=diff) for label, diff in diffs.items()]


def run_model_group(plan: Plan, dtype_name: str, results: Results) -> None:
    """Whole-model training steps (forward, backward, AdamW) for MoE and AoE at every d_low."""
    dtype = DTYPES[dtype_name]
    seq_len = plan.model_seq[dtype_name]
    configs = {"MoE": paper_732m("moe")}
    configs.update({f"AoE d_low {d}": paper_732m("aoe", d_low=d) for d in plan.d_lows})
    rows = []
    moe_flops = None
    # The first model in a process also pays one-time allocations, such as thread pools and
    # kernel caches. A throwaway step of the first config keeps them out of every measured peak.
    names = ["warm-up", *configs]
    configs = {"warm-up": configs["MoE"], **configs}
    for name in names:
        config = configs[name]
        ffn = dataclasses.replace(config.ffn, d_ffn=plan.d_ffn, n_experts=plan.n_experts, top_k=plan.top_k)
        attention = dataclasses.replace(config.attention, n_heads=plan.model_heads)
        config = dataclasses.replace(config, d_model=plan.d_model, n_layers=plan.model_layers,
                                     vocab_size=plan.model_vocab, max_seq_len=seq_len, ffn=ffn, attention=attention)
        # One model at a time, so that each peak includes its own parameters, gradients and
        # AdamW state and nothing of the other models.
        with memory_meter(plan.torch_device) as meter:
            case, model = model_case(name, config, plan.model_batch, seq_len, dtype, device=plan.torch_device)
            time_interleaved([case], 0 if name == "warm-up" else plan.repeats, f"model {dtype_name} {name}")
        if name != "warm-up":
            moe_flops = moe_flops or case.flops
            rows.append(_row(case, peak_bytes=meter.delta, flop_ratio=moe_flops / case.flops,
                             extra={"params": config.num_params()}))
        # The step closure references the model and its optimizer. Both must be gone before the next
        # model's baseline, or that baseline includes them and they are freed mid-measurement.
        del case, model
    results.model[dtype_name] = rows


def run_scaling_group(plan: Plan, results: Results) -> None:
    """Tokens/s and memory of both layers as tokens, experts and top-K grow, one knob at a time."""
    device, dtype = plan.torch_device, DTYPES[plan.scale_dtype]
    base = LayerShape(plan.scale_d_model, plan.scale_d_ffn, 8, 2, plan.scale_base_tokens)
    shapes = [dataclasses.replace(base, tokens=t) for t in plan.scale_tokens]
    shapes += [dataclasses.replace(base, n_experts=e) for e in plan.scale_experts if e != base.n_experts]
    shapes += [dataclasses.replace(base, top_k=k) for k in plan.scale_top_k if k != base.top_k]
    shapes = [s for s in shapes if s.top_k <= s.n_experts]
    cases, knobs = [], {}
    for shape in shapes:
        x, direction = layer_inputs(shape, dtype, device=device)
        for d_low in (None, plan.scale_d_low):
            full = dataclasses.replace(shape, d_low=d_low)
            name = f"{full.label()} T={full.tokens} E={full.n_experts} K={full.top_k}"
            cases.append(layer_case(name, build_layer(full, dtype, device=device), x, direction,
                                    full.train_flops()))
            knobs[name] = full
    peaks = _run_with_memory(cases, plan.repeats, f"scaling {plan.scale_dtype}", device)
    for case in cases:
        shape = knobs[case.name]
        results.scaling.append(_row(case, peak_bytes=peaks[case.name], extra={
            "layer": "MoE" if shape.d_low is None else "AoE", "tokens": shape.tokens,
            "experts": shape.n_experts, "top_k": shape.top_k}))


def run_suite(plan: Plan) -> Results:
    results = Results(plan)
    for dtype_name in plan.dtypes:
        run_layer_group(plan, dtype_name, results)
    for dtype_name in plan.dtypes:
        run_model_group(plan, dtype_name, results)
    run_scaling_group(plan, results)
    return results
