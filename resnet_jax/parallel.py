"""The device mesh and the two shardings every array of a run uses.

One 1-D mesh axis, `data`, over all devices of all processes: parameters and optimizer
state are replicated, batches are split along it. The same jit-compiled code then
serves one CPU, eight GPUs and a multi-host pod; XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
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


def data_parallel(devices: list | None = None) -> Parallel:
    """A `data` mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Parallel(Mesh(np.asarray(devices), (DATA_AXIS,)))
