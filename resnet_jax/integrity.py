"""Content checksums of checkpoints: computed on the devices at each save, recorded beside
the checkpoint off the training thread, compared with the restored arrays at every restore.

Orbax checks no content. A save computes a 64-bit checksum of every array of the state, in
jitted programs that the training thread only dispatches: they run on the devices beside
Orbax's copy of the state to the host, and the next step, to which the state is donated,
waits for both to have read it, so what is hashed is exactly what is saved, and nothing
on the host can overwrite it. A background thread of the first process fetches the
checksums (8 bytes an array) and writes them to `checkpoint_checksums/<step>.json` in the
workdir, atomically (`workdir.write_text_atomically`: a temporary file renamed, one upload
on object storage).

Why not SHA-256 of a host copy on a background thread, the other design: the training
thread would still copy the whole state (Orbax's own host copy is Orbax's), an
accelerator would transfer it to the host twice, and on a CPU the hashing competes with
the steps for the cores. Here the devices read the state once more and the host moves 8
bytes an array. For ResNet-50's state on a 2-core CPU, a save blocked the training
thread less with these checksums than with SHA-256, and little more than with no
checksums at all (`benchmarks/checkpoint_save.py`; the figures: `benchmarks/RESULTS.md`,
"Checkpoint save: blocking time on the training thread").

The checksum: the array's bytes as 32-bit words (2- and 1-byte dtypes widened, 8-byte
ones split), each word mixed with its index by an odd multiply and murmur3's finaliser,
both bijections, summed mod 2^32, in two lanes with different constants. Changing any one
word changes its term and so the sum; unrelated contents collide with probability about
2^-64. Integer arithmetic only, whose sums do not depend on their order: the same on
every backend, device count and JAX version.

A checkpoint whose record was never written (the run was killed between Orbax's commit
and the record) has no checksums to check against and is treated as damaged; a record
without its checkpoint (killed before Orbax's commit) is overwritten when that step is
saved again, or deleted by a later save.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax import lax

from resnet_jax.workdir import write_text_atomically

RECORD_DIR = "checkpoint_checksums"
ALGORITHM = "fmix32-sum-2x32"
# (word multiplier, odd; index multiplier) of each lane.
_LANES = ((0x9E3779B1, 0x85EBCA77), (0xC2B2AE3D, 0x27D4EB2F))
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a bijection that spreads every bit over the word."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


# One program per shape and dtype, each dispatched on its own: ResNet-50's state has ~30
# distinct ones, each compiling quickly, where one program over the whole tree made the
# first save block many times longer than a later one on a 2-core CPU (measured:
# benchmarks/RESULTS.md, "Checkpoint save: blocking time on the training thread").
@jax.jit
def _array_checksum(x: jax.Array) -> jax.Array:
    """Two uint32 lanes of `x`'s checksum."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    words = lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32).reshape(-1)
    index = jnp.arange(words.size, dtype=jnp.uint32)
    return jnp.stack([
        jnp.sum(_fmix32(words * jnp.uint32(word) + index * jnp.uint32(position)), dtype=jnp.uint32)
        for word, position in _LANES
    ])


def checksums(state: Any) -> Any:
    """The checksums of every array of `state`, as device arrays of the same tree: dispatched,
    not waited for (`as_record` fetches them)."""
    return jax.tree_util.tree_map(_array_checksum, state)


def compile_checksums(state: Any) -> None:
    """Compile the checksum programs for arrays like `state`'s now, by dispatching them on
    it once, so that saves only dispatch them: compiled at ResNet-50's first save, they
    blocked it many times longer than a later save on a 2-core CPU (the figures:
    benchmarks/RESULTS.md, "Checkpoint save: blocking time on the training thread"), and
    widened the time in which a kill leaves a committed checkpoint without its record."""
    checksums(state)


def as_record(pending: Any) -> dict[str, str]:
    """{tree path: 16 hex digits} of `checksums`' result, fetched to the host."""
    fetched = jax.device_get(pending)
    return {
        jax.tree_util.keystr(path): "".join(f"{int(lane):08x}" for lane in np.asarray(lanes))
        for path, lanes in jax.tree_util.tree_flatten_with_path(fetched)[0]
    }


def record_path(workdir: epath.PathLike, step: int) -> epath.Path:
    return epath.Path(workdir) / RECORD_DIR / f"{step}.json"


def write_record(workdir: epath.PathLike, step: int, arrays: dict[str, str]) -> None:
    """Write `step`'s checksums atomically (a kill leaves the old file or none, never half)."""
    path = record_path(workdir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps({"algorithm": ALGORITHM, "arrays": arrays}, indent=1) + "\n")


def read_record(workdir: epath.PathLike, step: int) -> dict[str, str] | None:
    """`step`'s recorded checksums, or None where none were written (or not readably)."""
    try:
        record = json.loads(record_path(workdir, step).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("algorithm") != ALGORITHM:
        return None
    return record.get("arrays") or None


def prune_records(workdir: epath.PathLike, below: int, kept_steps: set[int]) -> None:
    """Delete the records of steps before `below` whose checkpoints are gone."""
    for path in (epath.Path(workdir) / RECORD_DIR).glob("*.json"):
        if path.stem.isdigit() and int(path.stem) < below and int(path.stem) not in kept_steps:
            path.unlink(missing_ok=True)


class Recorder:
    """Writes each save's checksums from a background thread of the first process, one save
    at a time; `wait` returns once the last one is written (and raises what failed)."""

    def __init__(self, workdir: epath.PathLike, checkpoint_dir: epath.PathLike):
        self.workdir, self.checkpoint_dir = epath.Path(workdir), epath.Path(checkpoint_dir)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def record(self, step: int, pending: Any) -> None:
        """Record `checksums`' result for `step` in the background (first process only)."""
        self.wait()
        if jax.process_index() != 0:
            return
        self._thread = threading.Thread(target=self._write, args=(step, pending),
                                        name=f"checkpoint checksums {step}")
        self._thread.start()

    def _write(self, step: int, pending: Any) -> None:
        try:
            write_record(self.workdir, step, as_record(pending))
            kept = {int(p.name) for p in self.checkpoint_dir.iterdir() if p.name.isdigit()}
            prune_records(self.workdir, step, kept)
        except BaseException as error:  # raised on the training thread by the next wait()
            self._error = error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
