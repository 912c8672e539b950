"""The two-stage toy experiment: how a router MoE and an AoE layer place a class they have not seen.

Setup (after Appendix B of Lv et al., "Autonomy-of-Experts Models", ICML 2025; the paper gives
the design but not its sizes, so the sizes below are this project's choice):

- three Gaussian classes in R^D whose means lie on a circle of radius ``separation`` in the
  first two coordinates, 120 degrees apart, with unit-variance isotropic noise;
- one sparse layer (``aoe.layers.MoE`` or ``aoe.layers.AoE``) with two experts and top-1
  selection, followed by a linear classifier over the three classes; there is no residual
  path, so every prediction goes through the selected expert;
- stage 1 trains on classes 0 and 1 only; stage 2 trains on all three classes.

What is measured: the fraction of each class's points that each expert receives after stage 1
and after stage 2. For the new class 2 the summary is its *concentration*, the largest
fraction any single expert receives (1.0: one expert takes the class; 0.5: the class is split
evenly). When stage 1 leaves an expert *idle* (it receives at most ``IDLE_SHARE`` of the old
classes' points), the summary also counts how often the new class goes mostly to that expert.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from aoe.config_utils import check
from aoe.layers.moe import build_ffn
from aoe.model.config import FFNConfig

NUM_CLASSES = 3
NEW_CLASS = 2
# An expert that receives at most this share of the old classes' points after stage 1 counts as idle.
IDLE_SHARE = 0.2


@dataclass
class ToyConfig:
    """Sizes and optimisation settings of the toy experiment."""

    dim: int = 16
    hidden: int = 32
    d_low: int = 4
    separation: float = 4.0
    steps_per_stage: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    aux_loss_coef: float = 0.0
    eval_points_per_class: int = 1000

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "d_low", "steps_per_stage", "batch_size", "eval_points_per_class"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"toy.{name}", value, "expected a positive integer")
        check(self.dim >= 2, "toy.dim", self.dim, "expected at least 2, because the class means lie in a plane")
        check(self.d_low < self.dim, "toy.d_low", self.d_low, f"expected d_low < dim={self.dim}")
        check(self.separation > 0, "toy.separation", self.separation, "expected a number > 0")
        check(self.lr > 0, "toy.lr", self.lr, "expected a number > 0")
        check(self.aux_loss_coef >= 0, "toy.aux_loss_coef", self.aux_loss_coef, "expected a number >= 0")

    def ffn_config(self, kind: str) -> FFNConfig:
        """The two-expert, top-1 layer for ``kind`` 'moe' or 'aoe'; AoE's expert width matches MoE's parameters."""
        if kind not in ("moe", "aoe"):
            raise ValueError(f"invalid toy layer kind {kind!r}: expected 'moe' or 'aoe'")
        # d_wide_multiple=4 keeps AoE's fp32 rows 16-byte aligned, as torch._grouped_mm requires.
        return FFNConfig(kind=kind, d_ffn=self.hidden, n_experts=2, top_k=1, d_wide_multiple=4,
                         d_low=self.d_low if kind == "aoe" else None, aux_loss_coef=self.aux_loss_coef)


def class_means(config: ToyConfig) -> torch.Tensor:
    """Means of the three classes, shape (3, D): 120 degrees apart on a circle in the first two coordinates."""
    means = torch.zeros(NUM_CLASSES, config.dim)
    for c in range(NUM_CLASSES):
        angle = 2 * math.pi * c / NUM_CLASSES
        means[c, 0] = config.separation * math.cos(angle)
        means[c, 1] = config.separation * math.sin(angle)
    return means


def sample(config: ToyConfig, classes: list[int], count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``count`` points with labels spread uniformly over ``classes``; returns x (N, D) and y (N,)."""
    labels = torch.tensor(classes)[torch.randint(len(classes), (count,), generator=generator)]
    x = class_means(config)[labels] + torch.randn(count, config.dim, generator=generator)
    return x, labels


class ToyModel(nn.Module):
    """One two-expert sparse layer, then a linear classifier; no residual path."""

    def __init__(self, config: ToyConfig, kind: str):
        super().__init__()
        self.ffn = build_ffn(config.ffn_config(kind), config.dim, init_std=0.1)
        self.classifier = nn.Linear(config.dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return logits (N, 3), the layer's auxiliary loss, and each point's selected expert (N,)."""
        out, routing = self.ffn(x)
        return self.classifier(out), routing.aux_loss, self.selected_expert(x)

    @torch.no_grad()
    def selected_expert(self, x: torch.Tensor) -> torch.Tensor:
        """The expert each point goes to under top-1 selection (the argmax score, lower index on ties)."""
        scores, _ = self.ffn.scores(x)
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, 0]


@dataclass
class StageRouting:
    """Share of each class's evaluation points that each expert receives, and the class accuracy."""

    # fractions[c][e]: share of class c's points routed to expert e
    fractions: list[list[float]]
    accuracy: list[float]


@dataclass
class ToyResult:
    kind: str
    seed: int
    stage1: StageRouting
    stage2: StageRouting
    # Per logged step of stage 2: share of class-2 points going to the expert that ends up taking most of them.
    new_class_history: list[float] = field(default_factory=list)

    @property
    def new_class_expert(self) -> int:
        """The expert that receives most of the new class after stage 2."""
        shares = self.stage2.fractions[NEW_CLASS]
        return max(range(len(shares)), key=lambda e: shares[e])

    @property
    def concentration(self) -> float:
        """Largest share of the new class that one expert receives after stage 2 (0.5 to 1.0)."""
        return max(self.stage2.fractions[NEW_CLASS])

    @property
    def stage1_load(self) -> list[float]:
        """Share of the old classes' points each expert received after stage 1."""
        old = self.stage1.fractions[:NEW_CLASS]
        return [sum(row[e] for row in old) / len(old) for e in range(len(old[0]))]

    @property
    def idle_expert(self) -> int | None:
        """The expert left idle by stage 1 (at most IDLE_SHARE of the old classes), or None."""
        load = self.stage1_load
        expert = min(range(len(load)), key=lambda e: load[e])
        return expert if load[expert] <= IDLE_SHARE else None

    @property
    def to_idle_expert(self) -> bool | None:
        """Whether the new class went mostly to the idle expert; None when stage 1 left none idle."""
        if self.idle_expert is None:
            return None
        return self.new_class_expert == self.idle_expert

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(new_class_expert=self.new_class_expert, concentration=self.concentration,
                   stage1_load=self.stage1_load, idle_expert=self.idle_expert, to_idle_expert=self.to_idle_expert)
        return out


@torch.no_grad()
def measure_routing(model: ToyModel, x: torch.Tensor, y: torch.Tensor) -> StageRouting:
    model.eval()
    logits, _, expert = model(x)
    model.train()
    correct = logits.argmax(dim=-1) == y
    fractions, accuracy = [], []
    for c in range(NUM_CLASSES):
        in_class = y == c
        n = max(int(in_class.sum()), 1)
        fractions.append([float((expert[in_class] == e).sum()) / n for e in range(2)])
        accuracy.append(float(correct[in_class].sum()) / n)
    return StageRouting(fractions, accuracy)


def train_stage(model: ToyModel, optimizer: torch.optim.Optimizer, config: ToyConfig, classes: list[int],
                generator: torch.Generator, on_step=None) -> None:
    for step in range(config.steps_per_stage):
        x, y = sample(config, classes, config.batch_size, generator)
        logits, aux_loss, _ = model(x)
        loss = F.cross_entropy(logits, y) + aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step)


def run_toy(kind: str, seed: int, config: ToyConfig | None = None, history_every: int = 10) -> ToyResult:
    """Train one layer of ``kind`` ('moe' or 'aoe') through both stages and measure its routing."""
    return train_toy(kind, seed, config, history_every)[1]


def train_toy(kind: str, seed: int, config: ToyConfig | None = None,
              history_every: int = 10) -> tuple[ToyModel, ToyResult]:
    """Train one layer of ``kind`` through both stages; return the trained model and its measurements."""
    config = config or ToyConfig()
    torch.manual_seed(seed)
    model = ToyModel(config, kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    # The data stream and the evaluation set depend only on the seed, so MoE and AoE of one
    # seed see the same points in the same order.
    data_gen = torch.Generator().manual_seed(seed)
    eval_gen = torch.Generator().manual_seed(10_000 + seed)
    x_eval, y_eval = sample(config, list(range(NUM_CLASSES)), NUM_CLASSES * config.eval_points_per_class, eval_gen)

    train_stage(model, optimizer, config, [0, 1], data_gen)
    stage1 = measure_routing(model, x_eval, y_eval)

    history: list[list[float]] = []

    def record(step: int) -> None:
        if step % history_every == 0 or step == config.steps_per_stage - 1:
            history.append(measure_routing(model, x_eval, y_eval).fractions[NEW_CLASS])

    train_stage(model, optimizer, config, [0, 1, 2], data_gen, on_step=record)
    stage2 = measure_routing(model, x_eval, y_eval)

    result = ToyResult(kind, seed, stage1, stage2)
    result.new_class_history = [shares[result.new_class_expert] for shares in history]
    return model, result


def summarize(results: list[ToyResult]) -> dict[str, dict[str, float]]:
    """Summarise per layer kind: the new class's concentration, and where it went when stage 1 left an expert idle."""
    summary: dict[str, dict[str, float]] = {}
    for kind in sorted({r.kind for r in results}):
        rows = [r for r in results if r.kind == kind]
        conc = torch.tensor([r.concentration for r in rows], dtype=torch.float64)
        idle = [r for r in rows if r.idle_expert is not None]
        summary[kind] = {
            "seeds": len(rows),
            "concentration_mean": float(conc.mean()),
            "concentration_std": float(conc.std()) if len(rows) > 1 else 0.0,
            "concentration_min": float(conc.min()),
            "taken_by_one_expert": sum(r.concentration >= 0.9 for r in rows) / len(rows),
            "seeds_with_idle_expert": len(idle),
            # NaN when no seed left an expert idle.
            "to_idle_expert": sum(r.to_idle_expert for r in idle) / len(idle) if idle else math.nan,
            "stage2_accuracy_new_class": sum(r.stage2.accuracy[NEW_CLASS] for r in rows) / len(rows),
            "stage2_accuracy_old_classes": sum(sum(r.stage2.accuracy[:NEW_CLASS]) / NEW_CLASS for r in rows) / len(rows),
        }
    return summary
