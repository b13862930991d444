"""The command line of the experiments: one of the paper's experiments, trained and drawn.

    python -m resnet_jax.experiments NAME --out DIR [options] [--config.KEY=VALUE ...]


    depth      plain vs ResNet at each depth (Figure 6, Table 6; at 1202 the ResNet only,
               as the paper has no plain-1202) -> depth.md/.json/.png
    shortcuts  shortcut options A, B, C of ResNets (Table 3's comparison at CIFAR scale)
               -> shortcuts.md/.json/.png
    responses  std of every 3x3 layer's response (Figure 7), plain and ResNet nets
               -> responses.md/.json/.png
    table2     plain-18/34 vs ResNet-18/34 with option A shortcuts (Table 2, Figure 4) on
               ImageNet or an image folder (--dataset=image_folder --data_dir=DIR), scored
               with 10 crops as the paper's table -> table2.md/.json/.png

Every CIFAR net trains with the paper's CIFAR recipe, every table2 net with its ImageNet
recipe, into DIR/runs/<model>_seed<s> (an ordinary train.py workdir). Repeating a command
reuses the finished runs (unfinished ones resume), and experiments given the same --out
share the runs they have in common: the `responses` of `--out results/x` use the nets
that `depth --out results/x` trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from resnet_jax import cli
from resnet_jax.data.image_records import STREAMED_DATASETS
from resnet_jax.data.sources import DATASETS
from resnet_jax.experiments import error_tables, responses, table2
from resnet_jax.experiments.nets import (
    PAPER_IMAGENET_SHORTCUTS,
    cifar_depth,
    depth_nets,
    response_nets,
    shortcut_nets,
    table2_nets,
)
from resnet_jax.experiments.provenance import markdown, provenance
from resnet_jax.experiments.runs import (
    ExperimentError,
    RunOptions,
    check_runs,
    devices_per_run,
    finish_runs,
)
from resnet_jax.plot import MetricsError
from resnet_jax.workdir import WorkdirError, is_object_storage, workdir_path

DEFAULT_DEPTHS = {"depth": (20, 32, 44, 56, 110), "shortcuts": (32,), "responses": (20, 56, 110)}
# table2's nets are the paper's four ImageNet nets, on a streamed dataset.
EXPERIMENTS = (*DEFAULT_DEPTHS, "table2")
DEFAULT_DATASETS = {**dict.fromkeys(DEFAULT_DEPTHS, "cifar10"), "table2": "imagenet2012"}


def _depths(text: str) -> list[int]:
    try:
        depths = [cifar_depth(part.strip()) for part in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error}; pass a comma-separated list, e.g. 20,56,110") from None
    if len(set(depths)) != len(depths):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a depth")
    return depths


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m resnet_jax.experiments", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--config.KEY=VALUE overrides any key of every run's config, as train.py's do.",
    )
    p.add_argument("experiment", choices=EXPERIMENTS, metavar="NAME", help=", ".join(EXPERIMENTS))
    p.add_argument("--out", required=True, type=_local_folder, help="results folder; runs go to OUT/runs")
    p.add_argument("--dataset", choices=DATASETS + STREAMED_DATASETS,
                   help=f"default cifar10; table2: {', '.join(STREAMED_DATASETS)} (default imagenet2012)")
    p.add_argument("--depths", type=_depths,
                   help="CIFAR depths 6n+2; defaults: " + "; ".join(
                       f"{name} {','.join(map(str, d))}" for name, d in DEFAULT_DEPTHS.items()))
    p.add_argument("--seeds", type=_positive, default=1,
                   help="runs per net, seeds 0..K-1 (depth, shortcuts, table2)")
    p.add_argument("--steps", type=_positive,
                   help="iterations per run (default the paper's: 64000 on CIFAR, 600000 on ImageNet); "
                        "the schedule scales along")
    p.add_argument("--batch_size", type=_positive)
    p.add_argument("--data_dir", help="local dataset files (default: the recipe's; TFDS for CIFAR)")
    p.add_argument("--jobs", type=_positive, default=1,
                   help="runs trained at once, as subprocesses, one GPU each (default 1: one after another)")
    p.add_argument("--response_images", type=_positive,
                   help="responses: the first N eval images (default: the whole eval split)")
    return p


def _local_folder(text: str) -> Path:
    """--out: a local folder (the runs' subprocesses write their console logs there as files)."""
    try:
        path = workdir_path(text)  # refuses "gs:/x" and other schemes rather than make a local folder
    except WorkdirError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if is_object_storage(path):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the experiments' results go to a local folder; a single run trains in a "
            "gs:// workdir with train.py"
        )
    return Path(path)


def _check_args(args: argparse.Namespace) -> None:
    if args.out.exists() and not args.out.is_dir():
        raise ExperimentError(f"--out {args.out} is a file; expected a folder (new or of earlier results)")
    if args.experiment == "responses" and args.seeds != 1:
        raise ExperimentError(
            "--seeds applies to depth, shortcuts and table2; responses uses each net's seed-0 run"
        )
    if args.experiment != "responses" and args.response_images is not None:
        raise ExperimentError("--response_images applies to the responses experiment only")
    streamed = args.experiment == "table2"
    allowed = STREAMED_DATASETS if streamed else DATASETS
    if args.dataset is not None and args.dataset not in allowed:
        raise ExperimentError(f"--dataset={args.dataset}: {args.experiment} trains on {', '.join(allowed)}")
    if streamed and args.depths is not None:
        raise ExperimentError("--depths applies to the CIFAR experiments; table2 trains the paper's "
                              "plain-18, plain-34, ResNet-18 and ResNet-34")


def _write(out: Path, name: str, record: dict, body: str) -> None:
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{name}.md").write_text(body)


def run_experiment(args: argparse.Namespace, overrides: list[tuple[str, str]], argv: Sequence[str],
                   log: Callable[[str], None] = print) -> dict:
    """Train what is missing, then write OUT/<experiment>.{md,json,png}; return the record."""
    started = time.perf_counter()
    _check_args(args)
    out, name = args.out, args.experiment
    dataset = args.dataset or DEFAULT_DATASETS[name]
    options = RunOptions(dataset, args.steps, args.batch_size, args.data_dir, tuple(overrides))
    if name == "table2":
        nets = table2_nets(out, args.seeds, options)
    else:
        make_nets = {"depth": depth_nets, "shortcuts": shortcut_nets, "responses": response_nets}[name]
        nets = make_nets(out, args.depths or list(DEFAULT_DEPTHS[name]), args.seeds, options)
    runs = [run for net in nets for run in net.runs]
    check_runs(runs, devices_per_run(args.jobs), out)
    out.mkdir(parents=True, exist_ok=True)
    results = finish_runs(runs, args.jobs, out, log)

    config = runs[0].config
    title = f"{config.dataset.name}, {config.num_train_steps} iterations of batch {config.batch_size}"
    if name == "responses":
        records, num_images = responses.measure(nets, args.response_images)
        figure = responses.figure(records, out / f"{name}.png", f"std of 3x3 layer responses, {title}")
        record = {"experiment": name, "num_images": num_images, "nets": records}
        text = (
            f"Standard deviation of each 3x3 layer's response (after BN, before ReLU or the "
            f"addition; the paper's Figure 7), over all values of the first {num_images} "
            f"{config.dataset.eval_split!r} images, inference mode, each net's seed-0 run at its "
            f"final iteration. Layers: the stem, then each block's 3x3 layers; per-layer values "
            f"in {name}.json, drawn in [{figure.name}]({figure.name}).\n\n"
            + responses.markdown_table(records)
        )
    elif name == "table2":
        summary = table2.summarize(nets, results)
        figure = error_tables.depth_figure(nets, out / f"{name}.png", title)
        record = {"experiment": name, "nets": summary}
        text = (
            table2.markdown_table(summary) + "\n" + table2.setting_notes(nets)
            + "\nCurves as the paper's Figure 4 (seed 0; training error thin, center-crop validation "
            f"error bold): [{figure.name}]({figure.name}).\n"
        )
    else:
        summary = error_tables.summarize(nets, results)
        draw = error_tables.depth_figure if name == "depth" else error_tables.shortcuts_figure
        figure = draw(nets, out / f"{name}.png", title)
        record = {"experiment": name, "nets": summary}
        text = (
            error_tables.markdown_table(summary, with_shortcut=name == "shortcuts") + "\n"
            + error_tables.setting_notes(nets)
            + (f"\n{PAPER_IMAGENET_SHORTCUTS}\n" if name == "shortcuts" else "")
            + f"\nCurves (seed 0; training error thin, test error bold): [{figure.name}]({figure.name}).\n"
        )
    trained = sum(result.trained_now for result in results)
    record["runs_trained_now"], record["runs_reused"] = trained, len(results) - trained
    record["provenance"] = provenance(argv, time.perf_counter() - started)
    header = (
        f"# {name} experiment: {title}\n\n" + markdown(record["provenance"])
        + f"- Runs: {trained} trained by this command, {len(results) - trained} reused from earlier ones\n\n"
    )
    _write(out, name, record, header + text)
    log(f"wrote {out / name}.md, {name}.json, {figure.name}")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli.prepare_process()
    try:
        rest, overrides = cli.split_overrides(argv)
        run_experiment(parser().parse_args(rest), overrides, argv)
    except (*cli.USER_ERRORS, ExperimentError, MetricsError, ModuleNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
