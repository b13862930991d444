"""The device mesh and the two shardings every array of a run uses.

One 1-D mesh axis, `data`, over all devices of all processes: parameters and optimizer
state are replicated, batches are split along it. The same jit-compiled code then
serves one CPU, eight GPUs and a multi-host pod; XLA inserts the gradient all-reduce.
Several processes (hosts) join through JAX's own distributed runtime, before anything
else touches a device.
"""

from __future__ import annotations

import dataclasses
import os
import sys

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


def barrier(name: str) -> None:
    """Wait for every process (a no-op for one), so that all see the same files next."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _coordination_client():
    from jax._src import distributed  # the runtime's client: JAX has no public handle on it

    return distributed.global_state.client


def lost_processes(wait_seconds: float) -> list[int]:
    """After a collective failed: the processes that do not answer within `wait_seconds`,
    asked through the coordination service (process 0's; when that does not answer, process
    0 is the one lost). Empty when every process answers: the failure was something else."""
    client, me = _coordination_client(), jax.process_index()
    try:
        client.key_value_set(f"resnet_jax/alive/{me}", "1")
        lost = []
        for other in (i for i in range(jax.process_count()) if i != me):
            try:
                client.blocking_key_value_get(f"resnet_jax/alive/{other}", int(wait_seconds * 1000))
            except jax.errors.JaxRuntimeError:  # not there in time
                lost.append(other)
        return lost
    except jax.errors.JaxRuntimeError:  # the coordination service itself is gone
        return [0]


def exit_for_lost_processes(error: jax.errors.JaxRuntimeError, heartbeat_timeout: int, command: str) -> None:
    """When `error` is a collective's failure because a process of the run died: one
    paragraph naming it and the resume command, then exit LOST_PROCESS_EXIT_STATUS at once.

    At once, with os._exit: the normal exit would first wait at JAX's shutdown barrier for the
    dead process, and the coordination service aborts this process (status 134, a C++ stack
    dump) once the dead one has missed its heartbeats for `heartbeat_timeout` seconds. The
    run's own state is closed by then (the error has unwound training). Returns (the caller
    re-raises) when every process still answers."""
    if jax.process_count() == 1:
        return
    lost = lost_processes(max(1.0, heartbeat_timeout / 4))
    if not lost:
        return
    names = ", ".join(str(i) for i in lost)
    print(
        f"error: process {names} of this {jax.process_count()}-process run stopped answering (its host or "
        f"process died), so process {jax.process_index()} stops too ({str(error).splitlines()[0]}). Start "
        f"every process again, each with its command as before, to resume from the last checkpoint; "
        f"this one's:\n  python {command}",
        file=sys.stderr, flush=True,
    )
    sys.stdout.flush()
    os._exit(LOST_PROCESS_EXIT_STATUS)


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
