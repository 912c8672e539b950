"""The AoE paper's comparison grid as presets: every model, control and selection strategy.

Lv et al., "Autonomy-of-Experts Models" (ICML 2025) compare, in their Table 2, a router MoE
with and without the load-balancing loss L_aux, two MoE controls (a factorised gate
projection W_g, and a "large router" with as many parameters as AoE's scoring step at
d_low = 128), and AoE at d_low 64/128/256/512 with and without L_aux; and in Table 3, at
d_low = 256, top-P token choice and expert choice for both MoE and AoE. This module adds a
dense baseline with the same active parameters.

Every grid entry exists at two scales:

- ``paper``: the paper's 732M-total / 247M-active model (12 layers, d_model 768, 8 experts
  top-2, MoE expert width 3072) with the paper's training recipe (``aoe.train.presets.paper_run``);
- ``cpu``: a 1.1M-parameter model (4 layers, d_model 64) small enough to train the default
  grid of 21 runs on a two-core CPU (see the CPU recipe below for the token budget).

Entry names keep the paper's d_low values at both scales. At the CPU scale each d_low is the
paper's ratio d_low / d_model applied to the smaller d_model (256/768 of 64 is 21.3, used as
20 because CPU-scale widths are multiples of 4), so
``aoe-dlow256-laux`` names the same design point at both scales.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from aoe.model.config import AttentionConfig, FFNConfig, ModelConfig
from aoe.model.presets import paper_732m

SCALES = ("paper", "cpu")

PAPER_D_MODEL = 768
# The paper's large router: two linear maps 768 -> 1012 -> 8. large_router_hidden() would
# round n * d_low * d_model / (d_model + n) = 1013.4 to 1013; the paper's own value is kept.
PAPER_LARGE_ROUTER_HIDDEN = 1012
# The d_low whose scoring cost the large router matches, and the one Table 3 uses.
LARGE_ROUTER_D_LOW = 128
TABLE3_D_LOW = 256
# NOTE: the paper does not state the rank of the factorised-W_g MoE control; this grid uses
# d_low 256 (about d_model / 3, AoE's best setting), where the matched width d_wide = 3840 is
# exact and the control has exactly the MoE's parameter count.
FACTORIZED_GATE_D_LOW = 256

# The CPU scale. The active FFN width (two experts of 128) is 4 * d_model, like a dense Llama FFN.
# Expert widths and d_low are multiples of 4 there, so that every fp32 row is a multiple of
# 16 bytes, the alignment torch._grouped_mm (torch 2.13) requires of its operands.
CPU_WIDTH_MULTIPLE = 4
CPU_D_MODEL = 64
CPU_N_LAYERS = 4
CPU_N_HEADS = 4
CPU_D_FFN = 128
CPU_SEQ_LEN = 128
CPU_VOCAB_SIZE = 4096


@dataclass(frozen=True)
class GridEntry:
    """One row of the paper's comparison: which layer, which selection, which loss."""

    name: str
    label: str
    table: str  # "Table 2", "Table 3" or "baseline"
    kind: str  # dense | moe | aoe
    aux_loss: bool = True
    d_low: int | None = None  # at the paper scale; scaled by d_model / 768 at the CPU scale
    selection: str = "top_k"
    large_router: bool = False
    # The paper's average accuracy over its eight downstream tasks, for reference in reports.
    paper_avg: float | None = None

    def ffn_config(self, scale: str) -> FFNConfig:
        """Build the FFN block of this entry at ``scale`` ('paper' or 'cpu')."""
        _check_scale(scale)
        d_model = PAPER_D_MODEL if scale == "paper" else CPU_D_MODEL
        d_ffn = 3072 if scale == "paper" else CPU_D_FFN
        if self.kind == "dense":
            # Two active experts of width d_ffn have the parameters of one FFN of width 2 * d_ffn.
            return FFNConfig(kind="dense", d_ffn=2 * d_ffn)

        changes: dict = {"kind": self.kind, "d_ffn": d_ffn, "n_experts": 8, "top_k": 2,
                         "selection": self.selection,
                         "aux_loss_coef": 0.01 if self.aux_loss and self.selection != "expert_choice" else 0.0}
        multiple = 1 if scale == "paper" else CPU_WIDTH_MULTIPLE
        if self.d_low is not None:
            changes["d_low"] = scaled_d_low(self.d_low, d_model, multiple)
            changes["d_wide_multiple"] = multiple
        if self.large_router:
            changes["router"] = "large"
            if scale == "paper":
                changes["router_hidden"] = PAPER_LARGE_ROUTER_HIDDEN
            else:
                changes["router_match_d_low"] = scaled_d_low(LARGE_ROUTER_D_LOW, d_model, multiple)
        return FFNConfig(**changes)


def scaled_d_low(paper_d_low: int, d_model: int, multiple: int = 1) -> int:
    """Scale the paper's d_low to width ``d_model``: the same ratio d_low / 768, rounded to a multiple of ``multiple``."""
    return max(multiple, multiple * round(paper_d_low * d_model / PAPER_D_MODEL / multiple))


def _entries() -> list[GridEntry]:
    table2 = [
        GridEntry("moe", "MoE", "Table 2", "moe", aux_loss=False, paper_avg=43.28),
        GridEntry("moe-laux", "MoE + L_aux", "Table 2", "moe", paper_avg=43.68),
        GridEntry("moe-laux-factorized-wg", "MoE + L_aux + factorised W_g", "Table 2", "moe",
                  d_low=FACTORIZED_GATE_D_LOW, paper_avg=43.70),
        GridEntry("moe-laux-large-router", "MoE + L_aux + large router", "Table 2", "moe",
                  large_router=True, paper_avg=43.71),
    ]
    aoe_avgs = {64: (43.81, 44.12), 128: (44.39, 44.04), 256: (44.12, 44.46), 512: (43.77, 44.08)}
    for d_low, (avg, avg_aux) in aoe_avgs.items():
        table2.append(GridEntry(f"aoe-dlow{d_low}", f"AoE (d_low {d_low})", "Table 2", "aoe",
                                aux_loss=False, d_low=d_low, paper_avg=avg))
        table2.append(GridEntry(f"aoe-dlow{d_low}-laux", f"AoE (d_low {d_low}) + L_aux", "Table 2", "aoe",
                                d_low=d_low, paper_avg=avg_aux))
    table3 = [
        GridEntry("moe-top-p", "MoE, top-P", "Table 3", "moe", selection="top_p", paper_avg=43.87),
        GridEntry(f"aoe-dlow{TABLE3_D_LOW}-top-p", f"AoE (d_low {TABLE3_D_LOW}), top-P", "Table 3", "aoe",
                  d_low=TABLE3_D_LOW, selection="top_p", paper_avg=44.29),
        GridEntry("moe-expert-choice", "MoE, expert choice", "Table 3", "moe", aux_loss=False,
                  selection="expert_choice", paper_avg=43.89),
        GridEntry(f"aoe-dlow{TABLE3_D_LOW}-expert-choice", f"AoE (d_low {TABLE3_D_LOW}), expert choice", "Table 3",
                  "aoe", aux_loss=False, d_low=TABLE3_D_LOW, selection="expert_choice", paper_avg=44.17),
    ]
    dense = [GridEntry("dense", "Dense (same active parameters)", "baseline", "dense", aux_loss=False)]
    return table2 + table3 + dense


GRID: dict[str, GridEntry] = {entry.name: entry for entry in _entries()}

# The two configurations the comparison hinges on: MoE + L_aux and AoE at d_low ~ d_model/3 + L_aux.
HEADLINE_MOE = "moe-laux"
HEADLINE_AOE = f"aoe-dlow{TABLE3_D_LOW}-laux"
# Seeds per entry in the default CPU grid: three for the headline pair, one for every other row.
DEFAULT_SEEDS = {HEADLINE_MOE: 3, HEADLINE_AOE: 3}


def grid_entry(name: str) -> GridEntry:
    """Return the grid entry ``name``; raise ValueError with a suggestion for an unknown name."""
    if name not in GRID:
        close = difflib.get_close_matches(name, list(GRID), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown grid configuration {name!r}{hint} (known: {', '.join(GRID)})")
    return GRID[name]


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"invalid scale {scale!r}: expected one of {SCALES}")


def grid_model(name: str, scale: str = "cpu", vocab_size: int | None = None) -> ModelConfig:
    """Build the ModelConfig of grid entry ``name`` at ``scale``; ``vocab_size`` overrides the scale's default."""
    entry = grid_entry(name)
    _check_scale(scale)
    ffn = entry.ffn_config(scale)
    if scale == "paper":
        model = replace(paper_732m("moe"), ffn=ffn)
    else:
        model = ModelConfig(vocab_size=CPU_VOCAB_SIZE, d_model=CPU_D_MODEL, n_layers=CPU_N_LAYERS,
                            max_seq_len=CPU_SEQ_LEN, attention=AttentionConfig(n_heads=CPU_N_HEADS),
                            ffn=ffn, tie_embeddings=True)
    if vocab_size is not None:
        model = replace(model, vocab_size=vocab_size)
    # replace() re-runs validation, so a bad vocab_size raises here with the field name.
    return model


def default_seeds(name: str) -> int:
    """Return how many seeds the default CPU grid trains for entry ``name``."""
    return DEFAULT_SEEDS.get(name, 1)


def default_grid() -> list[tuple[str, int]]:
    """List every entry with its default seed count: 17 configurations, 21 runs."""
    return [(name, default_seeds(name)) for name in GRID]


# ----- run configs ----------------------------------------------------------------------------

# The CPU recipe: 8 sequences of 128 tokens per step (1,024 tokens) for 150 steps, so every run
# trains on 153,600 tokens. AdamW as in the paper (betas 0.9/0.95, weight decay 0.1, clipping 1.0),
# with the peak LR of the tiny-* run presets, 1e-3, 15 warm-up steps and cosine decay to 1e-4.
# Validation: 12 batches (12,288 held-out tokens, the same for every run) every 30 steps.
CPU_MICRO_BATCH = 8
CPU_MAX_STEPS = 150
CPU_WARMUP_STEPS = 15
CPU_LR = 1e-3
CPU_MIN_LR = 1e-4
CPU_EVAL_INTERVAL = 30
CPU_EVAL_BATCHES = 12
# Every run of a grid reads the training data in the same order.
GRID_DATA_SEED = 0


def run_name(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def grid_run(name: str, seed: int, scale: str = "cpu", data_path: str = "data/tiny", out_dir: str = "runs",
             vocab_size: int | None = None):
    """Build the complete RunConfig of grid entry ``name`` with model seed ``seed`` at ``scale``.

    The data order (data.seed) is the same for every run; ``seed`` only changes the model
    initialisation.
    """
    from aoe.train.config import CheckpointConfig, DataConfig, OptimConfig, RunConfig, ScheduleConfig, TrainConfig
    from aoe.train.presets import paper_run

    model = grid_model(name, scale, vocab_size)
    if scale == "paper":
        config = paper_run(run_name(name, seed), model)
        config.data.path = data_path
        config.data.seed = GRID_DATA_SEED
        config.train.seed = seed
        config.train.out_dir = out_dir
        return config
    return RunConfig(
        name=run_name(name, seed),
        model=model,
        data=DataConfig(path=data_path, seq_len=CPU_SEQ_LEN, micro_batch_size=CPU_MICRO_BATCH,
                        grad_accum_steps=1, seed=GRID_DATA_SEED),
        optim=OptimConfig(lr=CPU_LR, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleConfig(warmup_steps=CPU_WARMUP_STEPS, max_steps=CPU_MAX_STEPS, min_lr=CPU_MIN_LR),
        # One thread, so that runs repeat bit for bit on machines with any number of cores.
        train=TrainConfig(precision="fp32", device="cpu", log_interval=15, eval_interval=CPU_EVAL_INTERVAL,
                          eval_batches=CPU_EVAL_BATCHES, seed=seed, out_dir=out_dir, num_threads=1),
        checkpoint=CheckpointConfig(interval=0, keep_last=1),
    )
