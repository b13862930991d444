"""Evaluate a trained run: rebuild the model from the workdir's config, restore a
checkpoint's params and batch_stats, and score a split with the training run's own
evaluation (so the numbers equal the in-training eval of the same step exactly)."""

from __future__ import annotations

from pathlib import Path

from resnet_jax import checkpoint
from resnet_jax.config import ConfigError
from resnet_jax.data.sources import SPLITS
from resnet_jax.parallel import data_parallel
from resnet_jax.train import evaluate, load_data, make_eval_step


def evaluate_workdir(workdir: str | Path, step: str | int | None = "latest",
                     split: str | None = None, data_dir: str | None = None) -> dict:
    """{'step', 'error', 'top5_error', 'loss', 'num_examples'} of a checkpoint on a split
    (default: the eval split the run was trained with)."""
    if split is not None and split not in SPLITS:
        raise ConfigError(f"--split={split!r} is not accepted; expected one of {', '.join(SPLITS)}")
    workdir = Path(workdir)
    config = checkpoint.read_config(workdir)
    if split is not None:
        config.dataset.eval_split = split
    if data_dir is not None:
        config.dataset.data_dir = data_dir
    parallel = data_parallel()
    data = load_data(config, parallel, ("eval",))["eval"]
    step_number = checkpoint_step(workdir, step)  # once: "latest" must not move in between
    model, variables, _ = checkpoint.load(workdir, step_number)
    eval_step = make_eval_step(model, config.eval_batch_size, parallel)
    result = evaluate(eval_step, variables, data, config.eval_batch_size)
    return {"step": step_number, **result}


def checkpoint_step(workdir: Path, step: str | int | None) -> int:
    with checkpoint.manager(workdir, read_only=True) as mngr:
        return checkpoint.resolve_step(mngr, step)
