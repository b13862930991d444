"""The file descriptors a host's worker pools hold, checked against `ulimit -n` before a
pool starts or anything compiles.

Measured (`benchmarks/worker_startup.py`; benchmarks/RESULTS.md, "Input workers at pod
size"): a Grain pool holds `FDS_PER_WORKER` descriptors in the training process for each
of its workers (the worker's pipes and queues), whatever the examples, and
`RING_FDS_PER_WORKER` more for its mapping of the worker's ring (`piece_rings`; the worker
holds its ring's file, its own mapping of it and one of the control block). A piece that
crosses in shared-memory blocks of its own (larger than its ring's slots, or on a system
without rings) holds one per block, here or in flight, so such blocks count apart, from
the pipeline's own bound on pieces in shared memory. `FIXED_FDS` covers this process's
own (its libraries, JAX's runtime, checkpoint and metrics files, two per image folder for
its shared file list, two per pool for its rings' control block), with room to spare."""

from __future__ import annotations

import resource

from resnet_jax.data.sources import DataError

FIXED_FDS = 64
FDS_PER_WORKER = 8
RING_FDS_PER_WORKER = 1


def file_descriptors_needed(workers: int, shared_memory_blocks: int) -> int:
    """Descriptors a process needs for pools of `workers` workers in all, with at most
    `shared_memory_blocks` blocks of examples between them and this process (0 workers: no
    pool, nothing to check)."""
    if not workers:
        return 0
    return FIXED_FDS + (FDS_PER_WORKER + RING_FDS_PER_WORKER) * workers + shared_memory_blocks


def check_file_descriptors(train: tuple[int, int], evaluation: tuple[int, int]) -> None:
    """Refuses, naming the number needed and `ulimit -n`, pools whose descriptors would
    exceed this process's soft RLIMIT_NOFILE. Each pool is (workers, most shared-memory
    blocks in flight)."""
    workers, blocks = train[0] + evaluation[0], train[1] + evaluation[1]
    need = file_descriptors_needed(workers, blocks)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not need or soft == resource.RLIM_INFINITY or need <= soft:
        return
    raising = ("the hard limit allows it" if hard == resource.RLIM_INFINITY or need <= hard else
               f"the hard limit is {hard}, so raising it needs root: limits.conf, "
               f"or docker run --ulimit nofile={need}")
    raise DataError(
        f"The input pipeline needs about {need} file descriptors, but this process may open "
        f"{soft} (ulimit -n): {train[0]} training and {evaluation[0]} evaluation worker processes "
        f"at {FDS_PER_WORKER + RING_FDS_PER_WORKER} each (its pipes and queues, and the mapping of its "
        f"ring), up to {blocks} shared-memory blocks of examples in flight at one "
        f"each, plus {FIXED_FDS} of its own. Run `ulimit -n {need}` in the shell that launches "
        f"training ({raising}), or lower dataset.num_workers, dataset.eval_workers or "
        f"dataset.worker_buffer_size."
    )
