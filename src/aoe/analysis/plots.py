"""Figures for sweep reports and the toy experiment (matplotlib, written as PNG files).

The sweep figures are analogues of the AoE paper's (Lv et al., ICML 2025): training-loss
curves (its Figure 2), load and confidence entropy per layer (Figure 3), and each AoE
expert's mean activation norm over training (Figure 4). Every function takes plain numbers,
so callers decide where the numbers come from, and writes one PNG atomically.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402

# A curve: steps and values of the same length.
Curve = tuple[Sequence[float], Sequence[float]]


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` as PNG through a temporary file and a rename, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(handle)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Return the trailing mean over up to ``window`` values; the first points average the values so far."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(panels: dict[str, dict[str, Curve]], path: str | os.PathLike, smooth: int | dict[str, int] = 20,
                     ylabel: str = "training loss (cross-entropy)") -> Path:
    """Draw one panel per key of ``panels``, each with one smoothed curve per label.

    ``smooth`` is the moving-average window for every panel, or a window per panel title
    (a title missing from the dict, or a window of 1, is drawn unsmoothed).
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        window = smooth.get(title, 1) if isinstance(smooth, dict) else smooth
        for label, (steps, values) in curves.items():
            ax.plot(list(steps), moving_average(list(values), window), label=label, linewidth=1.3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        _zoom_to_tail(ax, curves, window)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _zoom_to_tail(ax, curves: dict[str, Curve], smooth: int) -> None:
    """Limit the y axis to the range after the first 10% of steps, where the curves differ."""
    tails = []
    for steps, values in curves.values():
        smoothed = moving_average(list(values), smooth)
        start = len(smoothed) // 10
        tails.extend(v for v in smoothed[start:] if math.isfinite(v))
    if tails:
        low, high = min(tails), max(tails)
        pad = 0.05 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)


def plot_routing_entropy(ent_load: dict[str, Sequence[float]], ent_conf: dict[str, Sequence[float]],
                         path: str | os.PathLike, num_experts: int = 8) -> Path:
    """Draw Ent_load per layer as lines and Ent_conf per layer as a heat map (rows: configurations)."""
    labels = list(ent_conf)
    fig, (ax_load, ax_conf) = plt.subplots(1, 2, figsize=(13, 0.45 * len(labels) + 2.6),
                                           gridspec_kw={"width_ratios": [1, 1.3]})
    for label, values in ent_load.items():
        ax_load.plot(range(len(values)), list(values), marker="o", label=label, linewidth=1.2)
    ax_load.axhline(math.log(num_experts), color="grey", linestyle=":", linewidth=1)
    ax_load.set_title(f"Ent_load per layer (dotted: ln {num_experts}, perfectly balanced)")
    ax_load.set_xlabel("layer")
    ax_load.set_ylabel("Ent_load (nats)")
    ax_load.grid(alpha=0.3)
    ax_load.legend(fontsize=7)

    if labels:
        matrix = [list(ent_conf[label]) for label in labels]
        width = max(len(row) for row in matrix)
        matrix = [row + [math.nan] * (width - len(row)) for row in matrix]
        image = ax_conf.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=math.log(num_experts))
        for r, row in enumerate(matrix):
            for c, value in enumerate(row):
                if math.isfinite(value):
                    ax_conf.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                                 color="white" if value < 0.6 * math.log(num_experts) else "black")
        ax_conf.set_yticks(range(len(labels)), labels, fontsize=7)
        ax_conf.set_xticks(range(width), [str(i) for i in range(width)])
        fig.colorbar(image, ax=ax_conf, label="Ent_conf (nats)")
    ax_conf.set_title("Ent_conf per layer (mean entropy of softmax over all scores)")
    ax_conf.set_xlabel("layer")
    return save_figure(fig, path)


def plot_expert_norms(histories: dict[str, tuple[Sequence[int], Sequence[Sequence[Sequence[float]]]]],
                      path: str | os.PathLike) -> Path:
    """Draw each expert's mean score over training, one row per configuration and one column per layer.

    ``histories[label] = (steps, scores)`` with ``scores[i][layer][expert]`` the mean score at
    ``steps[i]`` (for AoE: the expert's mean activation norm over the tokens of that window).
    """
    rows = list(histories)
    num_layers = max((len(scores[0]) for _, scores in histories.values() if scores), default=1)
    fig, axes = plt.subplots(max(len(rows), 1), num_layers, figsize=(3.2 * num_layers, 2.5 * max(len(rows), 1)),
                             squeeze=False, sharex=True)
    for r, label in enumerate(rows):
        steps, scores = histories[label]
        for layer in range(num_layers):
            ax = axes[r][layer]
            if scores and layer < len(scores[0]):
                num_experts = len(scores[0][layer])
                for expert in range(num_experts):
                    ax.plot(list(steps), [window[layer][expert] for window in scores], linewidth=1.0,
                            label=f"expert {expert}")
            ax.set_title(f"{label}\nlayer {layer}" if layer == 0 else f"layer {layer}", fontsize=8)
            ax.grid(alpha=0.3)
            if layer == 0:
                ax.set_ylabel("mean activation norm", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("step", fontsize=8)
    if rows:
        axes[0][-1].legend(fontsize=6, loc="best")
    return save_figure(fig, path)


# ----- toy experiment ----------------------------------------------------------------------------


def plot_toy(points: dict[str, tuple[Sequence[Sequence[float]], Sequence[int], Sequence[int]]],
             concentration: dict[str, Sequence[float]], histories: dict[str, Sequence[Sequence[float]]],
             path: str | os.PathLike, history_every: int = 10) -> Path:
    """Draw the toy experiment: where each layer sends every point, and how concentrated the new class is.

    ``points[kind] = (xy, label, expert)`` holds one seed's points after stage 2, and
    ``concentration[kind]`` one value per seed. ``histories[kind]`` holds, per seed, the new
    class's share of its main expert at every ``history_every`` steps of stage 2.
    """
    kinds = list(points)
    fig, axes = plt.subplots(1, len(kinds) + 2, figsize=(4.3 * (len(kinds) + 2), 4.0))
    markers = ["o", "s", "^"]
    colors = ["tab:blue", "tab:orange"]
    for ax, kind in zip(axes, kinds):
        xy, labels, experts = points[kind]
        for cls in sorted(set(labels)):
            for expert in sorted(set(experts)):
                chosen = [i for i in range(len(labels)) if labels[i] == cls and experts[i] == expert]
                if chosen:
                    ax.scatter([xy[i][0] for i in chosen], [xy[i][1] for i in chosen], s=6, alpha=0.5,
                               marker=markers[cls % 3], color=colors[expert % 2],
                               label=f"class {cls} -> expert {expert}")
        ax.set_title(f"{kind.upper()}: expert per point after stage 2")
        ax.legend(fontsize=6, markerscale=2)
        ax.set_aspect("equal", adjustable="datalim")

    ax = axes[len(kinds)]
    for offset, kind in enumerate(kinds):
        values = list(concentration[kind])
        ax.scatter([offset] * len(values), values, alpha=0.7)
        ax.hlines(sum(values) / len(values), offset - 0.25, offset + 0.25, color="black")
    ax.set_xticks(range(len(kinds)), [k.upper() for k in kinds])
    ax.set_ylim(0.45, 1.02)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_title("new class: share of its main expert\n(one dot per seed, bar: mean)")

    ax = axes[len(kinds) + 1]
    for kind, color in zip(kinds, ["tab:red", "tab:green"]):
        for i, history in enumerate(histories[kind]):
            ax.plot([history_every * j for j in range(len(history))], list(history), color=color, alpha=0.4,
                    linewidth=1.0, label=kind.upper() if i == 0 else None)
    ax.set_ylim(0.45, 1.02)
    ax.set_xlabel("stage-2 step")
    ax.set_title("new class: share of its final main expert")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
