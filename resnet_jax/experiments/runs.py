"""The training runs behind an experiment: their configs, their workdirs, and getting each
one finished, reusing what an earlier invocation already trained.

Every run is an ordinary `train_and_evaluate` workdir under `OUT/runs/<name>`, so
`evaluate.py`, `python -m resnet_jax.plot` and `checkpoint.load` read it as any other.
A finished run (its final checkpoint and final evaluation present) is never trained
again; an unfinished one resumes from its newest checkpoint. With `jobs > 1` runs train
as subprocesses (`python -m resnet_jax.experiments.train_one`), one device each on GPUs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_collections

from resnet_jax import checkpoint
from resnet_jax import config as config_lib
from resnet_jax.plot import read_metrics

RUNS_DIR = "runs"
LOGS_DIR = "logs"
# The paper's CIFAR recipe evaluates every 2000 and logs every 100 of its 64k iterations;
# a shortened schedule keeps the same number of points on its curves.
EVALS_PER_RUN = 32
LOGS_PER_RUN = 640
# Lines of a failed subprocess's console shown in the error.
LOG_TAIL_LINES = 15


class ExperimentError(ValueError):
    """An experiment that cannot run as asked; the message names the input and what is accepted."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: `name` is its directory under OUT/runs."""

    name: str
    config: ml_collections.ConfigDict
    workdir: Path


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What the command line sets for every run of an experiment."""

    dataset: str
    steps: int | None  # None: the recipe's (the paper's 64k CIFAR, 60e4 ImageNet iterations)
    batch_size: int | None
    data_dir: str | None
    overrides: tuple[tuple[str, str], ...]  # --config.KEY=VALUE, applied last


def run_config(model: str, seed: int, options: RunOptions, shortcut: str = "",
               recipe: Callable[[str, str], ml_collections.ConfigDict] = config_lib.cifar_recipe,
               ) -> ml_collections.ConfigDict:
    """The paper's recipe for `model` (its CIFAR one unless `recipe` says otherwise),
    changed only as the options say."""
    config = recipe(model, options.dataset)
    config.seed = seed
    config.model.shortcut = shortcut
    if options.steps is not None:
        # lr_boundaries are fractions of the run, so they scale along; the warm-up ends
        # on a logged training error, whatever the length.
        config.num_train_steps = options.steps
        config.eval_every_steps = max(1, options.steps // EVALS_PER_RUN)
        config.checkpoint_every_steps = config.eval_every_steps
        config.log_every_steps = max(1, options.steps // LOGS_PER_RUN)
    if options.batch_size is not None:
        config.batch_size = options.batch_size
    if options.data_dir is not None:
        config.dataset.data_dir = options.data_dir
    config_lib.apply_overrides(config, options.overrides)
    if config.dataset.name == "image_folder" and not config.dataset.num_classes:
        # What training records in config.json: a repeated command then finds the same config.
        config.dataset.num_classes = _folder_classes(config.dataset.data_dir)
    return config


@functools.cache
def _folder_classes(data_dir: str) -> int:
    from resnet_jax.data.image_records import ImageFolder

    return ImageFolder(data_dir, "train").num_classes


def make_run(out: Path, name: str, config: ml_collections.ConfigDict) -> Run:
    return Run(name, config, out / RUNS_DIR / name)


def check_runs(runs: Sequence[Run], num_devices: int, out: Path) -> None:
    """Refuse, before anything trains, a config that cannot run or a workdir under `out`
    that holds a run of another config (it is left as it is)."""
    for run in runs:
        config_lib.validate(run.config, num_devices)
        try:
            checkpoint.check_workdir(run.workdir, run.config, allow_config_change=False)
        except checkpoint.WorkdirError as error:
            raise ExperimentError(
                f"--out {out} already holds run {run.name!r} of another config, and nothing was "
                f"changed there. Repeat the command that made it (recorded in the .md files under "
                f"{out}) or choose another --out. Details: {error}"
            ) from None


def final_eval(run: Run) -> dict[str, float] | None:
    """The finished run's final numbers, or None while it is unfinished.

    Finished: the checkpoint of the last step is committed and metrics.jsonl holds the
    evaluation of that step (written before the checkpoint, so both or only the latter
    missing means a run to resume).
    """
    last = run.config.num_train_steps
    if not (run.workdir / checkpoint.CHECKPOINT_DIR).is_dir():
        return None
    with checkpoint.manager(run.workdir, read_only=True) as mngr:
        if last not in mngr.all_steps():
            return None
    curves = read_metrics(run.workdir)
    evals = dict(curves.get("eval_error", []))
    trains = curves.get("train_error", [])
    if last not in evals or not trains:
        raise ExperimentError(
            f"{run.workdir}: the checkpoint of the last step ({last}) is there but metrics.jsonl "
            "lacks its evaluation or any training error; was the file edited? Move the run away "
            "to train it again."
        )
    return {"test_error": evals[last], "final_train_error": trains[-1][1]}


@dataclasses.dataclass(frozen=True)
class RunResult:
    run: Run
    test_error: float  # fractions, as in metrics.jsonl
    final_train_error: float  # the last logged interval's training error
    trained_now: bool
    wall_s: float | None  # this invocation's training time; None when reused


def finish_runs(
    runs: Sequence[Run], jobs: int, out: Path, log: Callable[[str], None] = print
) -> list[RunResult]:
    """Train every unfinished run (resuming where one stopped); reuse finished ones."""
    todo = [run for run in runs if final_eval(run) is None]
    for run in runs:
        if run not in todo:
            log(f"reusing finished run {run.workdir}")
    wall = {}
    if jobs == 1:
        from resnet_jax.train import train_and_evaluate

        for number, run in enumerate(todo, start=1):
            log(f"training {run.workdir} ({number}/{len(todo)})")
            start = time.perf_counter()
            train_and_evaluate(run.config, run.workdir)
            wall[run.name] = time.perf_counter() - start
    elif todo:
        wall = _train_in_subprocesses(todo, jobs, out, log)
    results = []
    for run in runs:
        numbers = final_eval(run)
        if numbers is None:
            raise ExperimentError(
                f"{run.workdir}: training stopped before its last step (interrupted or preempted?); "
                "repeat the command to resume it"
            )
        results.append(RunResult(run, trained_now=run.name in wall, wall_s=wall.get(run.name), **numbers))
    return results


def devices_per_run(jobs: int) -> int:
    """How many devices each run trains on: all of this machine's when runs go one after
    another, one GPU (or the whole CPU) per subprocess with `jobs > 1`."""
    if jobs == 1:
        import jax

        return jax.device_count()
    platform, count = probe_devices()
    return 1 if platform == "gpu" else count


@functools.cache
def probe_devices() -> tuple[str, int]:
    """(platform, local device count), asked of a child process: this one must not hold
    the GPUs (and their memory) that the training subprocesses are about to use."""
    code = "import jax; d = jax.local_devices(); print(d[0].platform, len(d))"
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    platform, count = answer.stdout.split()[-2:]
    return platform, int(count)


def job_devices(jobs: int, platform: str, count: int) -> list[str | None]:
    """Each job slot's CUDA_VISIBLE_DEVICES value (None: unchanged, on CPU)."""
    if platform == "cpu":
        return [None] * jobs
    if platform != "gpu":
        raise ExperimentError(
            f"--jobs={jobs} runs one process per device, which works on GPUs and the CPU; "
            f"this machine's devices are {platform}: use --jobs=1 (one run at a time on all of them)"
        )
    if jobs > count:
        raise ExperimentError(f"--jobs={jobs}: at most one job per GPU; this machine has {count}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(count)]
    return ids[:jobs]


def _train_in_subprocesses(runs: Sequence[Run], jobs: int, out: Path, log: Callable[[str], None]) -> dict:
    platform, count = probe_devices()
    free_devices: queue.Queue = queue.Queue()
    for device in job_devices(jobs, platform, count):
        free_devices.put(device)
    (out / LOGS_DIR).mkdir(parents=True, exist_ok=True)

    def train(run: Run) -> tuple[str, float, int]:
        device = free_devices.get()
        try:
            env = dict(os.environ)
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            log_path = out / LOGS_DIR / f"{run.name}.log"
            log(f"training {run.workdir} in a subprocess" + (f" on GPU {device}" if device else "")
                + f"; console: {log_path}")
            start = time.perf_counter()
            with log_path.open("w") as console:
                process = subprocess.run(
                    [sys.executable, "-m", "resnet_jax.experiments.train_one", str(run.workdir)],
                    input=json.dumps(config_lib.to_dict(run.config)), text=True,
                    stdout=console, stderr=subprocess.STDOUT, env=env,
                )
            return run.name, time.perf_counter() - start, process.returncode
        finally:
            free_devices.put(device)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes = list(pool.map(train, runs))
    failed = [name for name, _, code in outcomes if code != 0]
    if failed:
        tails = []
        for name in failed:
            lines = (out / LOGS_DIR / f"{name}.log").read_text().splitlines()[-LOG_TAIL_LINES:]
            tails.append(f"--- {name}:\n" + "\n".join(lines))
        raise ExperimentError(f"{len(failed)} run(s) failed: {', '.join(failed)}\n" + "\n".join(tails))
    return {name: seconds for name, seconds, _ in outcomes}
