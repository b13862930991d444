"""The file descriptors a host's worker pools hold, checked against `ulimit -n` before a
pool starts or anything compiles.

Measured (benchmarks/RESULTS.md, "file descriptors of a worker pool"): the first Grain pool
of a process opens about `FIXED_FDS` descriptors (its threads' pipes, queues and the
resource tracker), and each worker about `FDS_PER_WORKER` more (its process's pipes, its
queue, its shared-memory handles). A run holds the training pool and the evaluation pool
at once, both of `dataset.num_workers` workers."""

from __future__ import annotations

import resource

from resnet_jax.data.sources import DataError

FIXED_FDS = 128
FDS_PER_WORKER = 20


def file_descriptors_needed(workers: int) -> int:
    """Descriptors a process needs for pools of `workers` workers in all (0: no pool)."""
    return FIXED_FDS + FDS_PER_WORKER * workers if workers else 0


def check_file_descriptors(train_workers: int, eval_workers: int) -> None:
    """Refuses, naming the number needed and `ulimit -n`, pools whose descriptors would
    exceed this process's soft RLIMIT_NOFILE."""
    workers = train_workers + eval_workers
    need = file_descriptors_needed(workers)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not need or soft == resource.RLIM_INFINITY or need <= soft:
        return
    raising = ("the hard limit allows it" if hard == resource.RLIM_INFINITY or need <= hard else
               f"the hard limit is {hard}, so raising it needs root: limits.conf, "
               f"or docker run --ulimit nofile={need}")
    raise DataError(
        f"The input pipeline needs about {need} file descriptors, but this process may open "
        f"{soft} (ulimit -n): {train_workers} training and {eval_workers} evaluation worker "
        f"processes at about {FDS_PER_WORKER} each, plus {FIXED_FDS}. Run `ulimit -n {need}` "
        f"in the shell that launches training ({raising}), or lower dataset.num_workers."
    )
