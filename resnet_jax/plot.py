"""`python -m resnet_jax.plot RUN_DIR [RUN_DIR ...] --out curves.png`: training curves in
the style of the paper's Figure 6.

Each run is one colour: its training error a thin line, its eval error a bold line with a
dot at each evaluation, in percent against iterations. Runs are read from their
`metrics.jsonl`; labels default to the `model.name` of the run's `config.json` (as
`resnet_jax.checkpoint` writes it). Run directories and the image may be local paths or
gs:// URLs (see `resnet_jax.workdir`).

matplotlib is imported only when a figure is drawn, so that `import resnet_jax.plot` (and
reading metrics) works without it; install it with `pip install -e .[plot]`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from etils import epath

from resnet_jax.workdir import WorkdirError, workdir_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
MATPLOTLIB_MISSING = "plotting needs matplotlib: pip install matplotlib (or pip install -e .[plot])"
# Widths that tell the two curves of one run apart at a glance, as in Figure 6.
TRAIN_LINE_WIDTH = 0.8
EVAL_LINE_WIDTH = 2.0
POINT_MARKER = "o"
TRAIN_MARKER_SIZE = 3.0
EVAL_MARKER_SIZE = 5.0

Curve = list[tuple[int, float]]


class MetricsError(ValueError):
    """A run directory whose metrics cannot be read; the message names the file and line."""


def _is_number(value: object) -> bool:
    # JSON true/false parse to bool, a subclass of int, and are not measurements.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _path(text: str | os.PathLike[str]) -> epath.Path:
    try:
        return workdir_path(text)
    except WorkdirError as error:
        raise MetricsError(str(error)) from None


def read_metrics(run_dir: str | os.PathLike[str]) -> dict[str, Curve]:
    """Every numeric metric of `run_dir/metrics.jsonl` as {name: [(step, value), ...]}.

    Each curve is sorted by step. A step logged more than once (a run resumed from an
    earlier checkpoint logs its steps again) keeps its last value.
    """
    run_dir = _path(run_dir)
    if not run_dir.is_dir():
        raise MetricsError(f"{run_dir}: no such run directory")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise MetricsError(f"{path}: not found")
    latest: dict[str, dict[int, float]] = {}
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MetricsError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            step = record.get("step") if isinstance(record, dict) else None
            if not _is_number(step) or not isinstance(step, int):
                raise MetricsError(f"{path}:{number}: expected a JSON object with an integer 'step'")
            for name, value in record.items():
                if name != "step" and _is_number(value):
                    latest.setdefault(name, {})[step] = float(value)
    if not latest:
        raise MetricsError(f"{path}: empty, no metrics recorded")
    return {name: sorted(by_step.items()) for name, by_step in latest.items()}


def _model_name(run_dir: epath.Path) -> str | None:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MetricsError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    # A workdir of train.py keeps the config under "config", beside its fingerprint.
    config = record.get("config", record) if isinstance(record, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    name = model.get("name") if isinstance(model, dict) else None
    return name if isinstance(name, str) else None


def run_labels(run_dirs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Each run's model name, or its directory name where it has none or shares it."""
    paths = [_path(run_dir) for run_dir in run_dirs]
    basenames = [path.name for path in paths]
    labels = [_model_name(path) or base for path, base in zip(paths, basenames, strict=True)]
    # Two runs of one model (seeds, shortcut options) would be indistinguishable by name.
    counts = Counter(labels)
    return [base if counts[label] > 1 else label for label, base in zip(labels, basenames, strict=True)]


def _run_colors(count: int) -> list:
    import matplotlib

    if count <= 10:
        return list(matplotlib.colormaps["tab10"].colors[:count])
    # Beyond tab10 colours would repeat; a continuous map keeps every run distinct.
    return [matplotlib.colormaps["viridis"](i / (count - 1)) for i in range(count)]


def _percent(curve: Curve) -> tuple[list[int], list[float]]:
    return [step for step, _ in curve], [100 * value for _, value in curve]


def draw_runs(
    ax: Axes, run_dirs: Sequence[str | os.PathLike[str]], labels: Sequence[str] | None = None
) -> None:
    """Draw each run's training (thin) and eval (bold) error on `ax`, with a legend.

    `labels` defaults to `run_labels(run_dirs)`. Reused by figures with several panels.
    """
    from matplotlib.lines import Line2D

    labels = run_labels(run_dirs) if labels is None else list(labels)
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    handles = []
    for run_dir, label, color in zip(run_dirs, labels, _run_colors(len(run_dirs)), strict=True):
        metrics = read_metrics(run_dir)
        if "train_error" not in metrics and "eval_error" not in metrics:
            raise MetricsError(f"{_path(run_dir) / METRICS_FILE}: no train_error or eval_error to plot")
        if "train_error" in metrics:
            train = metrics["train_error"]
            # A curve of one point has no line to draw: a marker shows it.
            ax.plot(*_percent(train), color=color, linewidth=TRAIN_LINE_WIDTH,
                    marker=POINT_MARKER if len(train) == 1 else None, markersize=TRAIN_MARKER_SIZE)
        if "eval_error" in metrics:
            # Evaluations are few: a marker at each shows when they ran (and a single one at all).
            ax.plot(*_percent(metrics["eval_error"]), color=color, linewidth=EVAL_LINE_WIDTH,
                    marker=POINT_MARKER, markersize=EVAL_MARKER_SIZE)
        handles.append(Line2D([], [], color=color, linewidth=EVAL_LINE_WIDTH, label=label))
    # The figure explains its own line styles, which the paper leaves to its caption.
    handles += [
        Line2D([], [], color="grey", linewidth=TRAIN_LINE_WIDTH, label="train"),
        Line2D([], [], color="grey", linewidth=EVAL_LINE_WIDTH, marker=POINT_MARKER,
               markersize=EVAL_MARKER_SIZE, label="eval"),
    ]
    ax.legend(handles=handles)
    ax.set_xlabel("iterations")
    ax.set_ylabel("error (%)")
    ax.grid(alpha=0.3)


def plot_curves(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
    title: str | None = None,
    ylim: tuple[float, float] | None = None,
) -> epath.Path:
    """Draw the runs' error curves (see `draw_runs`) into the image file `out`; return its path."""
    figure = new_figure((7, 4.5))
    ax = figure.add_subplot()
    draw_runs(ax, run_dirs, labels)
    if title:
        ax.set_title(title)
    # Errors are never negative; anchoring at 0 keeps figures of different runs comparable.
    ax.set_ylim(ylim if ylim is not None else (0, None))
    return save_figure(figure, out)


def new_figure(size: tuple[float, float]) -> Figure:
    """An empty figure of `size` inches, for one or several panels (`add_subplot`)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ModuleNotFoundError(MATPLOTLIB_MISSING) from error

    # A bare Figure on an Agg canvas: no pyplot state, no display, the caller's backend untouched.
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, out: str | os.PathLike[str]) -> epath.Path:
    """Write `figure` to the image file `out` (its suffix picks the format); return its path."""
    out = _path(out)
    image = io.BytesIO()  # drawn first: an unknown format leaves no empty file behind
    figure.savefig(image, format=out.suffix.lstrip(".") or None, dpi=150)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(image.getvalue())  # one upload on object storage
    return out


def _ylim(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in percent, e.g. 0,60; got {text!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise argparse.ArgumentTypeError(f"expected finite LOW < HIGH; got {text!r}")
    return low, high


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_jax.plot",
        description="Training (thin) and eval (bold) error against iterations, as in the paper's Figure 6.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help=f"a directory with {METRICS_FILE}")
    parser.add_argument("--out", required=True, help="image to write; its suffix picks the format")
    parser.add_argument("--title", help="title above the plot")
    parser.add_argument("--labels", help="comma-separated legend labels, one per RUN_DIR")
    parser.add_argument("--ylim", type=_ylim, metavar="LOW,HIGH", help="y range in percent, e.g. 0,60")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels is not None else None
    if labels is not None and len(labels) != len(args.run_dirs):
        parser.error(f"--labels has {len(labels)} labels for {len(args.run_dirs)} run directories")
    try:
        out = plot_curves(args.run_dirs, args.out, labels=labels, title=args.title, ylim=args.ylim)
    except (MetricsError, ModuleNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    print(out)


if __name__ == "__main__":
    main()
