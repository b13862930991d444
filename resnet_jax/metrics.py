"""Where a run's numbers go: `metrics.jsonl`, TensorBoard (optional) and the console.

Only the first process writes or prints, so a pod run has one log, not one per host.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax.workdir import is_object_storage, workdir_path

METRICS_FILE = "metrics.jsonl"
# Object storage cannot append: metrics.jsonl is uploaded whole, at most this often (and
# before each checkpoint and at the end), so that a long run does not upload a growing
# file at every log line.
UPLOAD_EVERY_SECONDS = 60.0


def classification_metrics(
    logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray | None = None
) -> dict[str, jnp.ndarray]:
    """Sums over the (unmasked) examples: loss, top-1 and top-5 errors, count."""
    logits = logits.astype(jnp.float32)
    mask = jnp.ones(labels.shape, bool) if mask is None else mask
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": jnp.sum(jnp.where(mask, losses, 0.0)),
        "errors": jnp.sum(mask & (jnp.argmax(logits, -1) != labels)),
        "top5_errors": jnp.sum(mask & ~jnp.any(top5 == labels[:, None], axis=-1)),
        "count": jnp.sum(mask),
    }


def _step_of(line: str) -> int | None:
    """A line's step; None for a line cut short when a run was killed mid-write."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class MetricWriter:
    """Appends one JSON object per line to `workdir/metrics.jsonl` and mirrors scalars to
    TensorBoard when tensorboardX is installed and wanted.

    On object storage, where nothing can be appended to, the file's lines are kept here and
    the whole file (and TensorBoard's) is uploaded again: at most every
    `UPLOAD_EVERY_SECONDS`, and at every `flush()` (before each checkpoint, so that a
    resumed run finds every line up to its step, and at the end).

    Without tensorboardX, a one-line note says so where `note_missing` (a run's start from
    scratch: once per run, not at every resume or report).
    """

    def __init__(self, workdir: str | os.PathLike[str], tensorboard: bool, note_missing: bool = True):
        self.enabled = jax.process_index() == 0
        workdir = workdir_path(workdir)
        self.path = workdir / METRICS_FILE
        # Object storage: every line of the file, and whether some are not uploaded yet.
        self.lines: list[str] | None = None
        self.pending = False
        self.uploaded_at = time.monotonic()
        self.summary = None
        if self.enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional: pip install -e .[tensorboard]
            except ImportError:
                if note_missing:
                    print("note: no TensorBoard events, as tensorboardX is not installed (pip install -e "
                          "'.[tensorboard]', or --config.tensorboard=false)", file=sys.stderr)
            else:
                # tensorboardX writes gs:// itself (with google-cloud-storage, which gcsfs brings).
                self.summary = SummaryWriter(os.fspath(workdir / "tensorboard"))

    def _stored_lines(self) -> list[str]:
        return self.path.read_text().splitlines(keepends=True) if self.path.exists() else []

    def drop_after(self, step: int) -> None:
        """Forget lines past `step` (and a last line cut short by a kill): the resumed run
        writes them again, identically."""
        if not self.enabled:
            return
        lines = self._stored_lines()
        kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
        if is_object_storage(self.path):
            self.lines = kept
        if len(kept) != len(lines):
            self.path.write_text("".join(kept))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **values}) + "\n"
        if self.summary is not None:
            for name, value in values.items():
                self.summary.add_scalar(name, value, step)
        if not is_object_storage(self.path):
            with self.path.open("a") as f:
                f.write(line)
            if self.summary is not None:
                self.summary.flush()
            return
        if self.lines is None:  # no drop_after before: continue the file as it is
            self.lines = self._stored_lines()
        self.lines.append(line)
        self.pending = True
        if time.monotonic() - self.uploaded_at >= UPLOAD_EVERY_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Store every line written so far (on a local disk each line already is)."""
        if not self.pending:
            return
        self.path.write_text("".join(self.lines))  # one upload: never half a file
        if self.summary is not None:
            self.summary.flush()  # tensorboardX too uploads its whole event file each time
        self.pending = False
        self.uploaded_at = time.monotonic()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        if self.summary is not None:
            self.summary.close()


class Progress:
    """The console line: step, loss, error, images/s and time left."""

    def __init__(self, total_steps: int):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps

    def report(self, step: int, values: dict[str, Any], seconds_per_step: float | None = None) -> None:
        if not self.enabled:
            return
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float) and math.isfinite(v)]
        if seconds_per_step is not None:
            parts.append(f"eta {_duration((self.total_steps - step) * seconds_per_step)}")
        print("  ".join(parts), flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

