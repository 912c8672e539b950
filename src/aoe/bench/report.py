"""Turn benchmark ``Results`` into target verdicts and the Markdown page docs/performance.md."""

from __future__ import annotations

from dataclasses import dataclass

from aoe.bench.suite import Results, Row

MIB = 1024**2

# Reasons a target can miss on this kind of machine, printed below the targets table when it does.
MISS_REASONS = {
    "utilisation": (
        "The layer's step is more than its expert GEMMs: the router or AoE's scoring, the stable "
        "sort, the row gather, SiLU and its backward, the weighted index_add, and the auxiliary "
        "loss and statistics are memory-bound and count no FLOPs. The expert GEMMs themselves "
        "have only T*K/E rows per expert, which is less efficient than the square matmul that "
        "sets the peak. With more than one thread on a shared machine, every barrier between "
        "threads also waits for a core that another process may hold."),
    "utilisation_bf16": (
        "torch's bf16 GEMM on a CPU without bf16 units (AVX2 only) converts operands inside a slow "
        "kernel, and its speed depends on the operand layout (about 5x between a plain and a "
        "transposed right operand). Our CPU path multiplies bf16 tensors in fp32 instead, so the "
        "layer can exceed the bf16 'peak'. At the few tokens that fit the time budget each expert "
        "gets a handful of rows, so the step is bound by reading and converting weights."),
    "aoe_ratio": (
        "AoE adds work that counts no FLOPs: the (T, E, d_low) cache is written, its norms are "
        "taken, and the selected rows are gathered from it, forward and backward. Its wider hidden "
        "layer (d_wide > d_ffn) also makes SiLU and the gate product larger."),
    "transformers": (
        "transformers' grouped_mm path runs the same expert GEMMs as ours (on CPU torch._grouped_mm "
        "returns results bit-identical to our per-expert mm loop). Only the work around them "
        "differs: our step also computes the load-balancing loss and the routing statistics, "
        "ranks experts with a stable sort, and keeps the router in fp32."),
    "memory": (
        "AoE keeps its (T, E, d_low) low-rank cache for the backward pass, and its hidden "
        "activations are d_wide/d_ffn times wider than the MoE's, at the same parameter count."),
}


@dataclass
class Verdict:
    name: str
    measured: str
    required: str
    holds: bool
    reason_key: str
    shortfall: str = ""


def _row(rows: list[Row], name: str) -> Row:
    return next(row for row in rows if row.name == name)


def evaluate(results: Results) -> list[Verdict]:
    """Check each target on ratios measured within one timed group."""
    verdicts = []
    for dtype_name, required in (("fp32", 0.80), ("bf16", 0.60)):
        if dtype_name not in results.sweep:
            continue
        fraction = _row(results.sweep[dtype_name], "MoE").flops_per_s / results.peak_flops(dtype_name)
        verdicts.append(Verdict(
            f"MoE layer training step, {dtype_name} share of {dtype_name} matmul peak",
            f"{fraction:.0%}", f">= {required:.0%}", fraction >= required,
            "utilisation" if dtype_name == "fp32" else "utilisation_bf16",
            f"{required - fraction:.0%} short" if fraction < required else ""))

    for dtype_name, rows in results.sweep.items():
        moe = _row(rows, "MoE")
        for row in rows[1:]:
            relative = row.tokens_per_s / moe.tokens_per_s
            target = 0.97 * row.flop_ratio
            verdicts.append(Verdict(
                f"{row.name} / MoE throughput ({dtype_name}) vs 0.97 x FLOP ratio {row.flop_ratio:.3f}",
                f"{relative:.3f}", f">= {target:.3f}", relative >= target, "aoe_ratio",
                f"{(target - relative) / target:.1%} short" if relative < target else ""))

    for dtype_name, required in (("bf16", 1.3), ("fp32", 1.0)):
        rows = results.transformers.get(dtype_name)
        if not rows or len(rows) < 2:
            continue
        fastest = max(rows[1:], key=lambda row: row.tokens_per_s)
        speedup = rows[0].tokens_per_s / fastest.tokens_per_s
        verdicts.append(Verdict(
            f"our MoE layer vs the fastest transformers block ({fastest.name}), {dtype_name}",
            f"{speedup:.2f}x", f">= {required:.1f}x", speedup >= required, "transformers",
            f"{(required - speedup) / required:.0%} short" if speedup < required else ""))

    rows = results.model.get("fp32")
    if rows:
        moe = _row(rows, "MoE")
        for row in rows[1:]:
            if moe.peak_bytes <= 0:
                # NOTE: a zero baseline means the memory meter saw no growth, so no ratio exists.
                continue
            ratio = row.peak_bytes / moe.peak_bytes
            verdicts.append(Verdict(
                f"{row.name} peak training memory / MoE's (whole model, fp32, AdamW)",
                f"{ratio:.3f}", "<= 1.10", ratio <= 1.10, "memory",
                f"{ratio - 1.10:.3f} over" if ratio > 1.10 else ""))
    return verdicts


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines + [""]


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.0f}"


def render(results: Results, environment: dict[str, str], notes: list[str] | None = None) -> str:
    """Render the whole Markdown page."""
    plan = results.plan
    verdicts = evaluate(results)
    out = ["# Performance", "",
           "Written by `make bench` (`aoe bench`); every number on this page comes from one run of it.", ""]

    out += ["## Machine and method", ""]
    out += [f"- {key}: {value}" for key, value in environment.items()]
    out += [
        "- Timing: each case runs once to warm up, then all cases of a group run round-robin "
        f"{plan.repeats} times and keep the median. Every ratio below is between cases of one group.",
        "- Noise: under load from other processes, a ratio between two cases still moves by several "
        "percent from run to run, so a target that holds or misses by less than about 10% may flip "
        "on a rerun. Whole models run one after another rather than round-robin (each needs the "
        "memory to itself), so their throughput columns carry the full swing of the load; read "
        "those tables for memory.",
        "- Training step: forward and backward of a layer (loss = <output, fixed random direction> "
        "plus the layer's auxiliary loss), or of the whole model plus an AdamW update.",
        "- FLOPs: the config's own count (`FFNConfig.forward_flops_per_token`, and "
        "`ModelConfig.train_flops_per_token` for models), times 3 for forward and backward. "
        "Utilisation divides achieved FLOP/s by the dense matmul peak of the same dtype, measured "
        "in the same group as the best of a square matmul with a plain and a transposed right operand.",
        "- Memory: peak resident set size (RSS) above the RSS before the step, read from the kernel's "
        "high-water mark (VmHWM, reset through /proc/self/clear_refs; sampled every 0.5 ms where that "
        "is unavailable), with glibc's mmap threshold pinned at 64 KiB so that freed tensors "
        "leave RSS at once (no tracemalloc). Layer rows count activations and gradients; model rows "
        "count parameters, gradients, AdamW state and activations.",
        "- bf16 on a CPU without bf16 matrix units: our expert GEMMs multiply bf16 operands in fp32 "
        "and round the product to bf16 (`_CPUGroupedMM` in `aoe/layers/experts.py`), while the bf16 "
        "peak is torch's own bf16 matmul kernel. A share above 100% means our path beats that "
        "kernel, not the hardware. transformers' blocks, and the attention and output layers of the "
        "whole model, use torch's bf16 kernels.",
        f"- Device: {plan.device}. `bench/gpu.sh` runs the same suite on one CUDA GPU "
        "(`aoe bench --device cuda`), with CUDA peak-allocated memory in place of RSS.", ""]

    out += list(notes or [])
    out += ["## Targets", ""]
    out += _table(["target", "measured", "required", "holds", "shortfall"],
                  [[v.name, v.measured, v.required, "yes" if v.holds else "NO", v.shortfall] for v in verdicts])
    missed = sorted({v.reason_key for v in verdicts if not v.holds})
    if missed:
        out += ["Why the missed targets miss:", ""]
        out += [f"- {MISS_REASONS[key]}" for key in missed] + [""]

    for dtype_name, rows in results.sweep.items():
        shape = plan.layer_shape(dtype_name)
        peak = results.peak_flops(dtype_name)
        out += [f"## MoE vs AoE at matched parameters, one layer, {dtype_name}", "",
                f"d_model {shape.d_model}, d_ffn {shape.d_ffn}, {shape.n_experts} experts, top-{shape.top_k}, "
                f"{shape.tokens} tokens per step; AoE's d_wide matches each expert's parameter count. "
                f"{dtype_name} matmul peak: " + ", ".join(f"{layout} {value / 1e9:.2f} GFLOP/s"
                                                         for layout, value in results.peak[dtype_name].items()) + ".", ""]
        moe = _row(rows, "MoE")
        out += _table(["layer", "tokens/s", "GFLOP/s", "of peak", "peak MiB", "AoE/MoE throughput", "FLOP ratio MoE/AoE"],
                      [[r.name, f"{r.tokens_per_s:.0f}", f"{r.flops_per_s / 1e9:.2f}", f"{r.flops_per_s / peak:.0%}",
                        _mib(r.peak_bytes), f"{r.tokens_per_s / moe.tokens_per_s:.3f}", f"{r.flop_ratio:.3f}"]
                       for r in rows])

    for dtype_name, rows in results.transformers.items():
        out += [f"## Our MoE layer vs transformers' MixtralSparseMoeBlock, {dtype_name}", "",
                "Same shapes, weights and inputs as the MoE row above; max abs diff is the largest "
                "absolute difference between the block's output and ours.", ""]
        out += _table(["implementation", "tokens/s", "GFLOP/s", "peak MiB", "ours is faster by", "max abs diff"],
                      [[r.note or r.name, f"{r.tokens_per_s:.0f}", f"{r.flops_per_s / 1e9:.2f}", _mib(r.peak_bytes),
                        f"{rows[0].tokens_per_s / r.tokens_per_s:.2f}x",
                        "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}"] for r in rows])
    if results.skipped:
        out += ["Not run:", ""] + [f"- {line}" for line in results.skipped] + [""]

    for dtype_name, rows in results.model.items():
        moe = _row(rows, "MoE")
        out += [f"## Whole model, {dtype_name}", "",
                f"The small paper model cut to {plan.model_layers} layers and a {plan.model_vocab}-token vocabulary, "
                f"batch {plan.model_batch} x {plan.model_seq[dtype_name]} tokens; one training step is "
                "forward, backward and AdamW. Each model is measured alone, one after another.", ""]
        out += _table(["model", "parameters", "tokens/s", "GFLOP/s", "peak MiB", "memory vs MoE", "throughput vs MoE",
                       "FLOP ratio MoE/AoE"],
                      [[r.name, f"{r.extra['params'] / 1e6:.1f} M", f"{r.tokens_per_s:.0f}", f"{r.flops_per_s / 1e9:.2f}",
                        _mib(r.peak_bytes), f"{r.peak_bytes / moe.peak_bytes:.3f}",
                        f"{r.tokens_per_s / moe.tokens_per_s:.3f}", f"{r.flop_ratio:.3f}"] for r in rows])

    if results.scaling:
        out += [f"## Scaling, {plan.scale_dtype}", "",
                f"One layer at d_model {plan.scale_d_model}, d_ffn {plan.scale_d_ffn}, AoE d_low {plan.scale_d_low}; "
                f"one knob changes at a time from {plan.scale_base_tokens} tokens, 8 experts, top-2.", ""]
        out += _table(["layer", "tokens", "experts", "top-K", "tokens/s", "GFLOP/s", "peak MiB"],
                      [[r.extra["layer"], str(r.extra["tokens"]), str(r.extra["experts"]), str(r.extra["top_k"]),
                        f"{r.tokens_per_s:.0f}", f"{r.flops_per_s / 1e9:.2f}", _mib(r.peak_bytes)]
                       for r in results.scaling])
    return "\n".join(out)
