"""The device mesh and the two shardings every array of a run uses.

One 1-D mesh axis, `data`, over all devices of all processes: parameters and optimizer
state are replicated, batches are split along it. The same jit-compiled code then
serves one CPU, eight GPUs and a multi-host pod; XLA inserts the gradient all-reduce.
Several processes (hosts) join through JAX's own distributed runtime, before anything
else touches a device.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shlex
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class Parallel:
    mesh: Mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        """Leading (batch) dimension split over the devices."""
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))


DISTRIBUTED_MODES = ("off", "auto")
# What a surviving process exits with when another process of the run died (docs/pods.md).
LOST_PROCESS_EXIT_STATUS = 3
# JAX's own default: a process is declared lost this long after its last heartbeat.
HEARTBEAT_TIMEOUT_SECONDS = 100


def initialize_distributed(
    mode: str = "off", coordinator_address: str | None = None, num_processes: int | None = None,
    process_id: int | None = None, heartbeat_timeout: int = HEARTBEAT_TIMEOUT_SECONDS,
) -> None:
    """Join a multi-process run with `jax.distributed.initialize`.

    With `coordinator_address` (host:port of process 0), `num_processes` and `process_id`
    given, they are used as is; with mode "auto" and none given, JAX reads them from the
    environment of a Cloud TPU pod, SLURM, Open MPI or a Kubernetes indexed Job. "off"
    without an address: a single process. `heartbeat_timeout` (seconds) is how long the
    others go on after a process stops answering (see docs/pods.md, "A host that dies").
    """
    explicit = coordinator_address is not None
    if mode == "off" and not explicit:
        return
    if explicit and (num_processes is None or process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id too")
    if heartbeat_timeout < 1:
        raise ValueError(f"--heartbeat_timeout must be a number of seconds >= 1, not {heartbeat_timeout}")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout)
    if jax.process_count() > 1:
        PeerWatch(heartbeat_timeout)


def barrier(name: str) -> None:
    """Wait for every process (a no-op for one), so that all see the same files next."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


DONE = "done"  # a process's last beat, at its normal exit


class PeerWatch:
    """A thread that notices a process of the run has died, before JAX's runtime does.

    Every process writes a counter into the coordination service's key-value store once a
    second and reads the others'. A process whose counter stands still for half the
    heartbeat timeout (or a coordination service that stops answering: process 0 is gone)
    ends this process at once with one paragraph and LOST_PROCESS_EXIT_STATUS. At once,
    with os._exit, from this thread: the main thread may be blocked in a collective or a
    barrier that only the runtime ends, and it ends it by aborting the process (status
    134, a C++ stack dump) once the dead process has missed its heartbeats for the whole
    timeout; a normal exit would wait at the runtime's shutdown barrier for it likewise.
    """

    BEAT_SECONDS = 1.0

    def __init__(self, heartbeat_timeout: int):
        from jax._src import distributed  # the runtime's client: JAX has no public handle on it

        self._client = distributed.global_state.client
        self._silent_after = heartbeat_timeout / 2
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peer-watch", daemon=True)
        self._thread.start()
        atexit.register(self.stop)  # after jax.distributed's own: runs before its shutdown
        global _peer_watch
        _peer_watch = self

    def stop(self) -> None:
        """At this process's normal exit (before the runtime's shutdown): stop watching, and
        tell the others that this process is done, not lost."""
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(jax.errors.JaxRuntimeError):
            self._client.key_value_set(self._key(jax.process_index()), DONE, allow_overwrite=True)

    def await_verdict(self) -> None:
        """Give the watch the time to find a lost process (and end this one), after a
        collective failed: that is how a dead peer first shows in the main thread."""
        self._stop.wait(self._silent_after + 2 * self.BEAT_SECONDS)

    @staticmethod
    def _key(process: int) -> str:
        return f"resnet_jax/beat/{process}"

    def _watch(self) -> None:
        me, count = jax.process_index(), jax.process_count()
        others = [i for i in range(count) if i != me]
        seen = dict.fromkeys(others, (None, time.monotonic()))  # last value read, and when it changed
        beat = 0
        while not self._stop.wait(self.BEAT_SECONDS):
            beat += 1
            try:
                self._client.key_value_set(self._key(me), str(beat), allow_overwrite=True)
                values = {i: self._try_get(self._key(i)) for i in others}
            except jax.errors.JaxRuntimeError:
                if not self._stop.is_set():
                    self._lost([0])
                return
            now = time.monotonic()
            seen = {i: seen[i] if values[i] == seen[i][0] else (values[i], now) for i in others}
            lost = [i for i in others if values[i] != DONE and now - seen[i][1] > self._silent_after]
            if lost and not self._stop.is_set():
                self._lost(lost)

    def _try_get(self, key: str) -> str | None:
        try:
            return self._client.key_value_try_get(key)
        except jax.errors.JaxRuntimeError as error:
            if "NOT_FOUND" in str(error):  # that process has not written its first beat yet
                return None
            raise

    def _lost(self, lost: list[int]) -> None:
        names = ", ".join(str(i) for i in lost)
        silent = "stopped answering" if lost != [0] else "and with it the run's coordinator stopped answering"
        sys.stdout.flush()
        print(
            f"error: process {names} of this {jax.process_count()}-process run {silent} (its host or process "
            f"died, or it stopped), so process {jax.process_index()} stops too. Start every process again, "
            f"each with its command as before, to resume from the last checkpoint; this one's:\n"
            f"  python {shlex.join(sys.argv)}",
            file=sys.stderr, flush=True,
        )
        os._exit(LOST_PROCESS_EXIT_STATUS)


_peer_watch: PeerWatch | None = None  # this process's, in a multi-process run


def await_lost_process_verdict() -> None:
    """After a runtime error (a failed collective): wait until the peer watch has had the
    time to find a dead process, which ends this process with its paragraph; then return,
    for the error to be raised as it is. A no-op in a single process."""
    if _peer_watch is not None:
        _peer_watch.await_verdict()


def gather_from_processes(share: np.ndarray) -> np.ndarray:
    """Every process's `share` (the same shape on each), concatenated in process order, on
    every process: what each process worked out for its part of a set, put together."""
    if jax.process_count() == 1:
        return share
    return np.asarray(multihost_utils.process_allgather(share, tiled=True))


def data_parallel(devices: list | None = None) -> Parallel:
    """A `data` mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Parallel(Mesh(np.asarray(devices), (DATA_AXIS,)))


def eval_batch_size_for(batch_size: int, num_examples: int, num_devices: int) -> int:
    """The eval batch for a set of `num_examples`: `batch_size`, or where the set is smaller,
    its size rounded up to a multiple of the device count, so that a small set is not
    padded (and computed) to a whole batch."""
    return min(batch_size, -(-max(num_examples, 1) // num_devices) * num_devices)
