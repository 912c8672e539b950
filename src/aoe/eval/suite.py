"""The downstream tasks aoe reports: names, shot counts, lm-eval task names and the results table.

The AoE paper evaluates ARC-Easy, PIQA, SIQA, WinoGrande and HellaSwag zero-shot and MNLI,
MRPC, QNLI, QQP and SST-2 three-shot, by accuracy, and reports eight of them (not MRPC and
QQP) plus their average. MMLU and ARC-Challenge are evaluated five-shot.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"

PAPER_TASKS = ("arc_easy", "piqa", "siqa", "winogrande", "hellaswag", "mnli", "mrpc", "qnli", "qqp", "sst2")
SHOTS = {"arc_easy": 0, "piqa": 0, "siqa": 0, "winogrande": 0, "hellaswag": 0,
         "mnli": 3, "mrpc": 3, "qnli": 3, "qqp": 3, "sst2": 3, "mmlu": 5, "arc_challenge": 5}
# lm-evaluation-harness 0.4.13 names of the standard (hub-backed) tasks
HUB_TASKS = {"arc_easy": "arc_easy", "piqa": "piqa", "siqa": "social_iqa", "winogrande": "winogrande",
             "hellaswag": "hellaswag", "mnli": "mnli", "mrpc": "mrpc", "qnli": "qnli", "qqp": "qqp", "sst2": "sst2",
             "mmlu": "mmlu", "arc_challenge": "arc_challenge"}
# task configs shipped in TASKS_DIR that read local files (aoe eval --data-dir)
LOCAL_TASKS = {task: f"aoe_{task}" for task in SHOTS}
ALIASES = {"social_iqa": "siqa", "arc_e": "arc_easy", "arc_c": "arc_challenge", "wino": "winogrande",
           "hella": "hellaswag"}
# (task, column header): the AoE paper's column order first, then the tasks that paper does not report
COLUMNS = (("arc_easy", "ARC-E"), ("piqa", "PIQA"), ("siqa", "SIQA"), ("winogrande", "WINO"),
           ("hellaswag", "HELLA"), ("mnli", "MNLI"), ("qnli", "QNLI"), ("sst2", "SST2"),
           ("mrpc", "MRPC"), ("qqp", "QQP"), ("mmlu", "MMLU"), ("arc_challenge", "ARC-C"))
MISSING = "missing"


def parse_tasks(spec: str) -> list[str]:
    """Expand "paper" and aliases in a comma-separated task list; keeps order, drops repeats."""
    tasks: list[str] = []
    for item in (part.strip().lower() for part in spec.split(",")):
        if not item:
            continue
        names = PAPER_TASKS if item == "paper" else (ALIASES.get(item, item),)
        for name in names:
            if name not in SHOTS:
                raise ValueError(f"unknown task {item!r}; expected 'paper' or some of: {', '.join(SHOTS)}")
            if name not in tasks:
                tasks.append(name)
    if not tasks:
        raise ValueError("no task given; expected --tasks paper or a comma-separated list")
    return tasks


def results_table(scores: dict[str, float | str], model_name: str) -> str:
    """Format a markdown table in the AoE paper's column order, accuracy in percent, with the average.

    Only requested tasks get a column. The average is over the tasks that have a score, and
    its header says how many of the requested tasks that is, so a table with a missing task
    is never mistaken for a complete one.
    """
    columns = [(task, header) for task, header in COLUMNS if task in scores]
    values = [scores[task] for task, _ in columns]
    numbers = [v for v in values if not isinstance(v, str)]
    average = f"{100 * sum(numbers) / len(numbers):.2f}" if numbers else MISSING
    avg_header = "AVG" if len(numbers) == len(values) else f"AVG ({len(numbers)} of {len(values)})"
    cells = [v if isinstance(v, str) else f"{100 * v:.2f}" for v in values]
    header = ["model", *(h for _, h in columns), avg_header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| " + " | ".join([model_name, *cells, average]) + " |"]
    return "\n".join(lines) + "\n"
