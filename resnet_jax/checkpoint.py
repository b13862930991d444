"""Orbax checkpoints of a run: save, resume, restore for evaluation, the run's identity.

A workdir holds `config.json` (the run's config and its fingerprint) and
`checkpoints/<step>/` written by an Orbax `CheckpointManager`: asynchronous saves,
the last `keep_checkpoints` kept plus the one with the lowest eval error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from resnet_jax import config as config_lib

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class WorkdirError(RuntimeError):
    """A workdir that this run must not use, or that holds no usable checkpoint."""


def claim_workdir(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Write `config.json`, or check that the one there describes this same run.

    A workdir holding a different run (another fingerprint) is refused and left as it is.
    """
    path = workdir / CONFIG_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != config_lib.fingerprint(config):
            diffs = config_lib.differences(config_lib.from_dict(saved["config"]), config)
            raise WorkdirError(
                f"{workdir} holds a different run (saved config vs this one: {'; '.join(diffs)}). "
                "Nothing was changed there; use a new --workdir, or the saved config to resume it."
            )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        record = {"fingerprint": config_lib.fingerprint(config), "config": config_lib.to_dict(config)}
        path.write_text(json.dumps(record, indent=2) + "\n")


def read_config(workdir: Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise WorkdirError(f"{path} not found: {workdir} is not a workdir written by train.py")
    return config_lib.from_dict(json.loads(path.read_text())["config"])


def _eval_error(metrics: dict) -> float:
    return metrics["eval_error"]


def manager(workdir: Path, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    policy = AnyPreservationPolicy([
        LatestN(keep),
        BestN(get_metric_fn=_eval_error, reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        # best_fn makes Orbax store each save's metrics; the policy decides what is kept.
        best_fn=_eval_error, best_mode="min",
        preservation_policy=policy, read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, metrics: dict | None = None) -> None:
    """Start an asynchronous save of `state` (training goes on while it is written)."""
    mngr.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """`step`'s state, placed with the shardings of `abstract_state` (ShapeDtypeStructs)."""
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def resolve_step(mngr: ocp.CheckpointManager, step: str | int | None) -> int:
    """A checkpoint step from "latest" (or None), "best" (lowest eval error) or a number."""
    steps = mngr.all_steps()
    if not steps:
        raise WorkdirError(f"no checkpoint in {mngr.directory}")
    if step in (None, "latest"):
        return max(steps)
    if step == "best":
        scored = [(m["eval_error"], s) for s in steps if (m := mngr.metrics(s)) and "eval_error" in m]
        if not scored:
            raise WorkdirError(f"no checkpoint in {mngr.directory} has an eval error; use latest or a step")
        return min(scored)[1]
    try:
        wanted = int(step)
    except ValueError:
        raise WorkdirError(f"step {step!r}: expected latest, best or a number") from None
    if wanted not in steps:
        raise WorkdirError(f"no checkpoint at step {wanted} in {mngr.directory}; there are: {steps}")
    return wanted


def load(workdir: str | Path, step: str | int | None = None):
    """(model, variables, config) of a run, for notebooks and scripts.

    `variables` is {'params', 'batch_stats'} at `step` ("latest" by default, "best", or
    a number), ready for `model.apply(variables, images, train=False)`.
    """
    from resnet_jax.train import abstract_train_state, build_model  # train imports this module

    workdir = Path(workdir)
    config = read_config(workdir)
    model = build_model(config)
    with manager(workdir, read_only=True) as mngr:
        chosen = resolve_step(mngr, step)
        state = restore(mngr, chosen, abstract_train_state(config, model))
    return model, {"params": state.params, "batch_stats": state.batch_stats}, config
