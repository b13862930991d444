"""Evaluate a trained run: rebuild the model from the workdir's config, restore a
checkpoint's params and batch_stats, and score a split with the training run's own
evaluation (so "center" numbers equal the in-training eval of the same step exactly).

Streamed datasets (image_folder, imagenet2012, imagenette) can also be scored the paper's
other ways (`scoring.MODES`): ten crops, or fully-convolutional at several scales. The
small in-memory datasets have images the size of the network's input, with nothing to
crop or rescale, so only "center" (the whole image) applies to them.

The eval batch and the number of decoding workers can be chosen at evaluation time, so a
run trained on a pod evaluates on a workstation; a set smaller than the batch is scored
as one batch of its own size (rounded up to the device count).
"""

from __future__ import annotations

import os

from resnet_jax import checkpoint, compile_cache, scoring
from resnet_jax.config import ConfigError, check_evaluation
from resnet_jax.data.image_records import STREAM_SPLITS, STREAMED_DATASETS
from resnet_jax.data.sources import SPLITS
from resnet_jax.parallel import data_parallel
from resnet_jax.train import eval_metrics, open_inputs, with_dataset_classes
from resnet_jax.workdir import check_reachable, workdir_path


def evaluate_workdir(workdir: str | os.PathLike[str], step: str | int | None = "latest",
                     split: str | None = None, data_dir: str | None = None, mode: str = "center",
                     average: str = "scores", eval_batch_size: int | None = None,
                     num_workers: int | None = None, loader: str | None = None) -> dict:
    """{'step', 'mode', 'error', 'top5_error', 'loss', 'num_examples'} of a checkpoint on a
    split (default: the eval split the run was trained with), scored as `mode` says
    (multi_scale: also 'average', where its softmax and averages happen, `scoring.AVERAGES`).

    `eval_batch_size` (a positive multiple of the device count), `num_workers` (a
    streamed dataset's decoding processes, as `dataset.num_workers`) and `loader` (its
    `dataset.loader`) replace the run's values; they change how the work is split, not the
    scores (to float rounding of the mean loss; another loader, to its resampler's rounding)."""
    if mode not in scoring.MODES:
        raise ConfigError(f"--mode={mode!r} is not accepted; expected one of {', '.join(scoring.MODES)}")
    if average not in scoring.AVERAGES:
        raise ConfigError(f"--multi_scale_average={average!r} is not accepted; expected one of "
                          f"{', '.join(scoring.AVERAGES)}")
    workdir = workdir_path(workdir)
    check_reachable(workdir)
    config = checkpoint.read_config(workdir)
    compile_cache.enable(config.compilation_cache_dir)  # the run's own setting, before anything compiles
    streamed = config.dataset.name in STREAMED_DATASETS
    if mode != "center" and not streamed:
        raise ConfigError(
            f"--mode={mode} needs a streamed dataset ({', '.join(STREAMED_DATASETS)}), whose images "
            f"are larger than the network's input; {config.dataset.name}'s images are scored whole: "
            "use --mode=center"
        )
    splits = STREAM_SPLITS if streamed else SPLITS
    if split is not None and split not in splits:
        raise ConfigError(
            f"--split={split!r} is not accepted for {config.dataset.name}; "
            f"expected one of {', '.join(splits)}"
        )
    if split is not None:
        config.dataset.eval_split = split
    if data_dir is not None:
        config.dataset.data_dir = data_dir
    parallel = data_parallel()
    with_evaluation_settings(config, eval_batch_size, num_workers, parallel.num_devices, loader)
    inputs = open_inputs(config, parallel, ("eval",))
    with_dataset_classes(config, inputs.num_classes)  # refuses data with other classes than the run's
    step_number = checkpoint_step(workdir, step)  # once: "latest" must not move in between
    model, variables, _ = checkpoint.load(workdir, step_number)
    eval_step = inputs.eval_step(model, mode, average)
    with inputs.eval_passes(mode) as one_pass:
        result = eval_metrics(eval_step, variables, one_pass())
    protocol = {"mode": mode, "average": average} if mode == "multi_scale" else {"mode": mode}
    return {"step": step_number, **protocol, **result}


def with_evaluation_settings(config, eval_batch_size: int | None, num_workers: int | None,
                             num_devices: int, loader: str | None = None) -> None:
    """Set the eval batch, worker count and loader given (None: the run's) on `config`, and refuse
    values that cannot run on these devices, the run's own included (an eval batch of a
    pod that does not divide over this machine's devices), before anything is read."""
    if eval_batch_size is not None:
        config.eval_batch_size = eval_batch_size
    if num_workers is not None:
        config.dataset.num_workers = num_workers
    if loader is not None:
        config.dataset.loader = loader
    try:
        check_evaluation(config, num_devices)
    except ConfigError as error:
        raise ConfigError(f"{error}; evaluate.py's --eval_batch_size, --num_workers and --loader replace the "
                          f"run's values (now eval_batch_size={config.eval_batch_size}, num_workers="
                          f"{config.dataset.num_workers}, loader={config.dataset.loader})") from None


def checkpoint_step(workdir: os.PathLike[str], step: str | int | None) -> int:
    with checkpoint.manager(workdir, read_only=True) as mngr:
        return checkpoint.resolve_step(mngr, step)
