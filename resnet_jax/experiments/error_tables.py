"""The `depth` and `shortcuts` experiments' results: test error per net (mean and std over
seeds, each seed's value, the paper's number beside it), as JSON, a markdown table and the
paper's Figure 6 style curves; `table2` builds on the same records, notes and panels."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from resnet_jax.experiments.nets import (
    PAPER_IMAGENET_SCHEDULE,
    PAPER_NOTES,
    PAPER_SCHEDULE,
    Net,
    paper_schedule_differences,
    param_count,
)
from resnet_jax.experiments.runs import RunResult
from resnet_jax.plot import draw_runs, new_figure, save_figure

# Width of one panel in inches; panels share the y axis so their errors compare at a glance.
PANEL_SIZE = (6.0, 4.5)
# Per net family: the paper's recipe, what its numbers are, and the setting they come from.
PAPER_SETTINGS = {
    "cifar": ("CIFAR", "CIFAR-10 test errors at 64k iterations of batch 128 (Table 6)", PAPER_SCHEDULE),
    "imagenet": ("ImageNet", "ImageNet top-1 validation errors, 10-crop, after 60e4 iterations of batch "
                 "256 (Table 2)", PAPER_IMAGENET_SCHEDULE),
}
TEST_ERROR_NOTE = "Test error: the evaluation after the last iteration,"


def percent(fractions: Sequence[float]) -> list[float]:
    return [round(100 * value, 4) for value in fractions]


def spread(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (None with one seed: no spread was measured)."""
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
        "per_seed": list(values),
    }


def summarize(nets: Sequence[Net], results: Sequence[RunResult],
              paper_key: str = "paper_cifar10_test_error_percent") -> list[dict]:
    """One record per net: its parameters, test and final training error (%) over seeds,
    the paper's number (under `paper_key`), and each run (workdir relative to OUT, trained
    now or reused)."""
    by_name = {result.run.name: result for result in results}
    records = []
    for net in nets:
        runs = [by_name[run.name] for run in net.runs]
        records.append({
            "net": net.label,
            "model": net.model,
            "shortcut": net.shortcut_option,
            "depth": net.depth,
            "params": param_count(net),
            "test_error_percent": spread(percent([r.test_error for r in runs])),
            "final_train_error_percent": spread(percent([r.final_train_error for r in runs])),
            paper_key: net.paper_test_error,
            "paper_note": PAPER_NOTES.get(net.depth) if net.paper_test_error is not None else None,
            "runs": [
                {
                    "seed": run.config.seed,
                    "workdir": f"runs/{run.name}",
                    "trained_now": result.trained_now,
                    "train_wall_s": None if result.wall_s is None else round(result.wall_s, 1),
                }
                for run, result in zip(net.runs, runs, strict=True)
            ],
        })
    return records


def cell(spread: dict) -> str:
    """'mean ± std', or the mean alone with one seed."""
    return f"{spread['mean']:.2f}" + (f" ± {spread['std']:.2f}" if spread["std"] is not None else "")


def markdown_table(records: Sequence[dict], with_shortcut: bool) -> str:
    head = ["net"] + (["shortcut"] if with_shortcut else []) + [
        "params", "test error (%)", "per seed", "final train error (%)", "paper, CIFAR-10 (%)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for record in records:
        paper = record["paper_cifar10_test_error_percent"]
        paper_cell = "—" if paper is None else f"{paper:.2f}" + (
            f" ({record['paper_note']})" if record["paper_note"] else ""
        )
        cells = [record["net"]] + ([record["shortcut"]] if with_shortcut else []) + [
            f"{record['params']:,}",
            cell(record["test_error_percent"]),
            ", ".join(f"{value:.2f}" for value in record["test_error_percent"]["per_seed"]),
            cell(record["final_train_error_percent"]),
            paper_cell,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def setting_notes(nets: Sequence[Net], family: str = "cifar", measured: str = TEST_ERROR_NOTE) -> str:
    """What the numbers are (`measured` says what the error columns hold), and how far they
    are from the setting of the paper's numbers for the `family`'s nets."""
    recipe, paper_numbers, paper_schedule = PAPER_SETTINGS[family]
    config = nets[0].runs[0].config
    seeds = len(nets[0].runs)
    lines = [
        f"Dataset {config.dataset.name}, trained on its {config.dataset.train_split!r} split and "
        f"evaluated on the whole {config.dataset.eval_split!r} split; {config.num_train_steps} "
        f"iterations of batch {config.batch_size}, learning rate {config.learning_rate} divided by "
        f"{round(1 / config.lr_decay_factor)} at fractions {tuple(config.lr_boundaries)} of the run "
        f"(the paper's {recipe} recipe otherwise). {measured} mean ± sample std over {seeds} "
        "seed(s) (no std with one seed). Final train error: the last logged interval, on "
        "augmented batches in training mode.",
    ]
    differences = paper_schedule_differences(config, paper_schedule)
    if differences:
        lines.append(
            f"The paper's numbers are {paper_numbers}; "
            f"this setting differs ({', '.join(differences)}), so they are context, not a target."
        )
    return "\n\n".join(lines) + "\n"


def draw_panels(panels: Sequence[tuple[str, Sequence[Net], Sequence[str]]], out: Path, title: str) -> Path:
    """One panel per (title, nets, labels), side by side: each net's seed-0 run, training
    error thin and test error bold against iterations (plot.draw_runs)."""
    figure = new_figure((PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]))
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (panel_title, nets, labels) in zip(axes, panels, strict=True):
        draw_runs(ax, [net.runs[0].workdir for net in nets], labels)
        ax.set_title(panel_title)
    axes[0].set_ylim(0, None)  # shared: errors are never negative
    figure.suptitle(title)
    return save_figure(figure, out)


def depth_figure(nets: Sequence[Net], out: Path, title: str) -> Path:
    """Figure 6: plain nets left, ResNets right."""
    panels = []
    for kind, name in (("plain", "plain"), ("resnet", "ResNet")):
        chosen = [net for net in nets if net.kind == kind]
        panels.append((f"{name} (seed 0)", chosen, [net.label for net in chosen]))
    return draw_panels(panels, out, title)


def shortcuts_figure(nets: Sequence[Net], out: Path, title: str) -> Path:
    """Options A, B, C of each depth in one panel per depth."""
    panels = []
    for depth in dict.fromkeys(net.depth for net in nets):
        chosen = [net for net in nets if net.depth == depth]
        labels = [f"{net.label} {net.shortcut_option}" for net in chosen]
        panels.append((f"ResNet-{depth}, shortcuts A/B/C (seed 0)", chosen, labels))
    return draw_panels(panels, out, title)
