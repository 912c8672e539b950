"""The human-readable end of a run: RUN/report.md with a loss-curve PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aoe.train.checkpoint import atomic_write_text
from aoe.train.metrics import read_metrics


def plot_loss_curve(run_dir: Path, path: Path) -> bool:
    """Plot train and validation loss against the step; return False when there is nothing to plot."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "val"]
    if not train and not val:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write RUN/report.md (and RUN/loss_curve.png) from the summary and the metrics file."""
    lines = [f"# Run {summary['name']}", ""]
    has_plot = plot_loss_curve(run_dir, run_dir / "loss_curve.png")
    if has_plot:
        lines += ["![loss curve](loss_curve.png)", ""]
    lines += ["| metric | value |", "|---|---|"]
    for key in ("model_kind", "total_params", "active_params", "steps", "tokens_seen", "wall_time_s",
                "tokens_per_s", "peak_flops", "mfu", "final_train_loss", "val_loss", "val_ppl",
                "mean_active_experts"):
        if summary.get(key) is not None:
            lines.append(f"| {key} | {_fmt(summary[key])} |")
    layers = summary.get("routing_train") or []
    if any(layer is not None for layer in layers):
        lines += ["", "## Routing per layer (training tokens)", "",
                  "| layer | Ent_load | Ent_conf | mean active experts | mean score per expert |", "|---|---|---|---|---|"]
        for index, layer in enumerate(layers):
            if layer is None:
                continue
            scores = ", ".join(f"{s:.3g}" for s in layer["mean_score"])
            lines.append(f"| {index} | {layer['ent_load']:.4f} | {layer['ent_conf']:.4f} | "
                         f"{layer['mean_active_experts']:.3f} | {scores} |")
    lines += ["", "Files: config.json (resolved config), metrics.jsonl, summary.json, routing.json, tb/ (TensorBoard).", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
