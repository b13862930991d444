"""The device mesh and the two shardings every array of a run uses.

One 1-D mesh axis, `data`, over all devices of all processes: parameters and optimizer
state are replicated, batches are split along it. The same jit-compiled code then
serves one CPU, eight GPUs and a multi-host pod; XLA inserts the gradient all-reduce.
Several processes (hosts) join through JAX's own distributed runtime, before anything
else touches a device.
"""

from __future__ import annotations

import dataclasses

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


def initialize_distributed(
    mode: str = "off", coordinator_address: str | None = None, num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join a multi-process run with `jax.distributed.initialize`.

    With `coordinator_address` (host:port of process 0), `num_processes` and `process_id`
    given, they are used as is; with mode "auto" and none given, JAX reads them from the
    environment of a Cloud TPU pod, SLURM, Open MPI or a Kubernetes indexed Job. "off"
    without an address: a single process.
    """
    explicit = coordinator_address is not None
    if mode == "off" and not explicit:
        return
    if explicit and (num_processes is None or process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id too")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def barrier(name: str) -> None:
    """Wait for every process (a no-op for one), so that all see the same files next."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


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
