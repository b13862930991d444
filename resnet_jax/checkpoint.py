"""Orbax checkpoints of a run: save, resume, restore for evaluation, the run's identity.

A workdir holds `config.json` (the run's config and its fingerprint) and
`checkpoints/<step>/` written by an Orbax `CheckpointManager`: asynchronous saves,
the last `keep_checkpoints` kept plus the one with the lowest eval error.

Orbax checks no content, so each save records a checksum of every array, computed on the
devices and written off the training thread to `checkpoint_checksums/<step>.json`
(`resnet_jax/integrity.py` says how and why), and every restore recomputes and compares
them: a damaged checkpoint, or one whose checksums were never recorded, is reported with
its path, never loaded. Damaged checkpoints met while resuming are moved to
`checkpoints_damaged/` (kept for inspection, out of Orbax's way, with their checksums
record) and the run falls back to the newest intact one.

Workdirs are local folders or `gs://` URLs: every path here is an `etils.epath.Path` made
by `workdir.workdir_path`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from resnet_jax import config as config_lib
from resnet_jax import integrity
from resnet_jax.parallel import barrier
from resnet_jax.state import abstract_train_state, build_model
from resnet_jax.workdir import WorkdirError, workdir_path, write_text_atomically

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"


class DamagedCheckpoint(WorkdirError):
    """A checkpoint whose files are missing, unreadable, or differ from their recorded hashes."""


def _record(config: ml_collections.ConfigDict) -> dict:
    return {"fingerprint": config_lib.fingerprint(config), "config": config_lib.to_dict(config)}


def _saved_fingerprint(saved: dict) -> str | None:
    """The fingerprint of a saved run, recomputed from its config with today's schema (keys
    added since it was written take their defaults, so the same run still matches)."""
    if not isinstance(saved.get("config"), dict):
        return saved.get("fingerprint")
    return config_lib.fingerprint(config_lib.from_dict(saved["config"]))


def check_workdir(
    workdir: str | os.PathLike[str], config: ml_collections.ConfigDict, allow_config_change: bool
) -> None:
    """Refuse, changing nothing, a workdir that holds a different run.

    A different run is a saved `config.json` with another fingerprint, or checkpoints
    with no `config.json` at all. With `allow_config_change` the run may continue there
    (say, with more steps); its checkpoints must still fit the new model, which
    `check_compatible` verifies before anything is written.
    """
    workdir = workdir_path(workdir)
    path = workdir / CONFIG_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if _saved_fingerprint(saved) != config_lib.fingerprint(config) and not allow_config_change:
            diffs = config_lib.differences(config_lib.from_dict(saved["config"]), config)
            raise WorkdirError(
                f"{workdir} holds a different run (saved config vs this one: {'; '.join(diffs)}). "
                "Nothing was changed there; use a new --workdir, the saved config to resume it, "
                "or --allow_config_change to continue that run's checkpoints with this config."
            )
    elif (workdir / CHECKPOINT_DIR).exists() and not allow_config_change:
        raise WorkdirError(
            f"{workdir} holds checkpoints but no {CONFIG_FILE}, so they may belong to another run; "
            "nothing was changed there. Use a new --workdir, or --allow_config_change to continue them."
        )


def write_config(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict) -> None:
    """Write `config.json`; a different one already there is kept as config.<fingerprint>.json."""
    if jax.process_index() != 0:
        return
    workdir = workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    record = _record(config)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == record["fingerprint"]:
            return
        # The same run saved before keys were added is rewritten with them, not set aside.
        if _saved_fingerprint(saved) != record["fingerprint"]:
            path.rename(workdir / f"config.{saved.get('fingerprint', 'unknown')}.json")
    try:
        write_text_atomically(path, json.dumps(record, indent=2) + "\n")
    except FileNotFoundError as error:  # on object storage: no such bucket (the first write of a run)
        raise WorkdirError(f"cannot write {path}: {error}; does the bucket exist?") from None


def read_config(workdir: str | os.PathLike[str]) -> ml_collections.ConfigDict:
    workdir = workdir_path(workdir)
    path = workdir / CONFIG_FILE
    if not path.exists():
        raise WorkdirError(f"{path} not found: {workdir} is not a workdir written by train.py")
    return config_lib.from_dict(json.loads(path.read_text())["config"])


def _eval_error(metrics: dict) -> float:
    return metrics["eval_error"]


class Manager(ocp.CheckpointManager):
    """Orbax's manager of a workdir's checkpoints, whose `save`s also record their checksums
    (`integrity.Recorder`): waiting for its saves waits for their records too."""

    def __init__(self, workdir: epath.Path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checksums = integrity.Recorder(workdir, self.directory)
        # The newest step whose save is complete, where a rerun would resume (None: none yet),
        # and a save started since, which may have finished by now (None: none). Kept here
        # because Orbax waits for the previous save before it starts the next one.
        self.finished_step: int | None = self.latest_step()
        self.unfinished_step: int | None = None

    def save(self, step: int, *args, **kwargs) -> bool:
        saved = super().save(step, *args, **kwargs)  # waits for the previous save first
        if saved:
            self.unfinished_step = step
        return saved

    def wait_until_finished(self) -> None:
        super().wait_until_finished()
        self.checksums.wait()
        self.finished_step, self.unfinished_step = self.latest_step(), None

    def reload(self) -> None:
        super().reload()  # after a damaged checkpoint was set aside, say
        self.finished_step = self.latest_step()


# What Orbax logs (as a warning, through absl) whenever a read-only manager opens: a note, not
# a problem, and the only one that options cannot avoid.
_READ_ONLY_NOTE = "Given directory is read only=%s"


class _WithoutReadOnlyNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _READ_ONLY_NOTE


@contextlib.contextmanager
def _read_only_note_hidden():
    """Orbax's read-only note left out of the log while a manager opens; everything else kept."""
    absl_logger, note_filter = logging.getLogger("absl"), _WithoutReadOnlyNote()
    absl_logger.addFilter(note_filter)
    try:
        yield
    finally:
        absl_logger.removeFilter(note_filter)


def manager(workdir: str | os.PathLike[str], keep: int = 3, read_only: bool = False) -> Manager:
    """The workdir's checkpoint manager; `read_only`: one that never writes (for restoring,
    evaluating, checking), opened without Orbax's notes about it."""
    policy = AnyPreservationPolicy([
        LatestN(keep),
        BestN(get_metric_fn=_eval_error, reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        # best_fn makes Orbax store each save's metrics; the policy decides what is kept.
        best_fn=_eval_error, best_mode="min",
        preservation_policy=policy, read_only=read_only, create=not read_only,
        # Leftovers of a save that was killed half-way are removed at the next start.
        cleanup_tmp_directories=not read_only,
        # A read-only manager saves nothing: said here, Orbax need not set it and warn.
        save_interval_steps=0 if read_only else 1,
    )
    workdir = workdir_path(workdir)
    with _read_only_note_hidden() if read_only else contextlib.nullcontext():
        return Manager(
            workdir, workdir / CHECKPOINT_DIR, options=options, item_handlers=ocp.StandardCheckpointHandler(),
        )


def save(mngr: Manager, step: int, state: Any, metrics: dict | None = None) -> None:
    """Start an asynchronous save of `state` and of its checksums (training goes on while
    they are written; `mngr.wait_until_finished()` waits for both)."""
    pending = integrity.checksums(state)  # dispatched before the state can be donated
    mngr.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
    mngr.checksums.record(step, pending)


def wait_until_recorded(mngr: Manager) -> None:
    """Wait for the last save and its checksums, then for every process: none leaves
    (nor reads the checkpoints) before the first process has recorded them."""
    mngr.wait_until_finished()
    barrier("checkpoint checksums recorded")


def _path_name(path: tuple) -> str:
    """'params/conv1/kernel': one spelling for a state's paths and the same paths as Orbax's
    metadata stores them (dict keys and list indices where the state has fields)."""
    parts = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    return "/".join(str(part) for part in parts)


def _shapes(tree: Any) -> dict[str, tuple]:
    return {
        _path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def check_compatible(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
    """Raise, naming the first differing key path with both shapes and dtypes, when the
    checkpoint at `step` does not fit `abstract_state` (another model, classes or dtype)."""
    path = mngr.directory / str(step)
    try:
        stored = _shapes(mngr.item_metadata(step))
        committed = mngr.metadata(step).commit_timestamp_nsecs
        recorded = integrity.read_record(mngr.directory.parent, step)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        problem = f"{type(error).__name__}: {str(error)[:300]}"
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read: {problem}") from None
    # Orbax reads a missing step metadata file (its metrics, its commit) as empty.
    if committed is None:
        raise DamagedCheckpoint(f"checkpoint {path} has no step metadata (_CHECKPOINT_METADATA)")
    # A save killed part-way can leave metadata listing only some arrays: that is damage,
    # not another model, and must be set aside rather than stop the run as a misfit.
    if not recorded:
        raise DamagedCheckpoint(
            f"checkpoint {path} has no recorded content checksums (its save did not finish)")
    if len(recorded) != len(stored):
        raise DamagedCheckpoint(
            f"checkpoint {path} was not completely written: its metadata lists {len(stored)} of the "
            f"{len(recorded)} arrays it recorded"
        )
    wanted = _shapes(abstract_state)
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            have = "absent" if key not in stored else f"{stored[key][0]} {stored[key][1]}"
            need = "absent" if key not in wanted else f"{wanted[key][0]} {wanted[key][1]}"
            raise WorkdirError(
                f"checkpoint {path} does not fit this config's model: "
                f"{key} is {have} in the checkpoint but {need} in the model. Nothing was changed."
            )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """`step`'s state, placed like `abstract_state` (ShapeDtypeStructs with shardings),
    after `check_compatible` and with every array checked against the checksums recorded
    when it was saved."""
    check_compatible(mngr, step, abstract_state)  # also: the checksums are there
    path = mngr.directory / str(step)
    recorded = integrity.read_record(mngr.directory.parent, step)
    try:
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    # tensorstore reports damage as ValueError, OSError or a bare Exception; the tree's
    # structure was checked against the metadata before, so what fails here is reading.
    except Exception as error:
        problem = f"{type(error).__name__}: {str(error)[:300]}"
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read: {problem}") from None
    actual = integrity.as_record(integrity.checksums(state))
    for key in sorted(set(recorded) | set(actual)):
        if recorded.get(key) != actual.get(key):
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: {key} differs from its recorded checksum")
    return state


def restore_latest_intact(workdir: str | os.PathLike[str], mngr: ocp.CheckpointManager, abstract_state: Any):
    """(step, state) of the newest checkpoint that restores intact, or (None, None) if there
    are none. Damaged ones are moved to `checkpoints_damaged/` with a warning; if all are
    damaged the run stops rather than start again from scratch over them."""
    workdir = workdir_path(workdir)
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            return step, restore(mngr, step, abstract_state)
        except DamagedCheckpoint as error:
            print(f"warning: {error}; moved to {DAMAGED_DIR}/, trying an older one", file=sys.stderr)
            if jax.process_index() == 0:
                set_aside = _set_aside(mngr.directory / str(step), workdir / DAMAGED_DIR)
                record = integrity.record_path(workdir, step)
                if record.exists():
                    record.rename(set_aside / record.name)
            barrier(f"set aside damaged checkpoint {step}")  # no process looks before it moved
            mngr.reload()
    if steps:
        raise WorkdirError(
            f"every checkpoint in {mngr.directory} is damaged (moved to {workdir / DAMAGED_DIR}); "
            "nothing intact to resume from"
        )
    return None, None


def _set_aside(step_dir: epath.Path, damaged_dir: epath.Path) -> epath.Path:
    """Move a damaged step's folder into `damaged_dir`, under a name not taken there yet
    (the same step can be saved, and damaged, again after the run fell back); its new path."""
    damaged_dir.mkdir(parents=True, exist_ok=True)
    target, copies = damaged_dir / step_dir.name, 1
    while target.exists():
        copies += 1
        target = damaged_dir / f"{step_dir.name}.{copies}"
    step_dir.rename(target)  # on object storage a copy of each file, then their deletion
    return target


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


def load(workdir: str | os.PathLike[str], step: str | int | None = None):
    """(model, variables, config) of a run, for notebooks and scripts.

    `variables` is {'params', 'batch_stats'} at `step` ("latest" by default, "best", or
    a number), ready for `model.apply(variables, images, train=False)`. A damaged
    checkpoint raises `DamagedCheckpoint` naming its path.
    """
    workdir = workdir_path(workdir)
    config = read_config(workdir)
    model = build_model(config)
    with manager(workdir, read_only=True) as mngr:
        chosen = resolve_step(mngr, step)
        abstract_state = abstract_train_state(config, model)
        state = restore(mngr, chosen, abstract_state)
    return model, {"params": state.params, "batch_stats": state.batch_stats}, config
