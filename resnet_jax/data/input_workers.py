"""Input worker processes and the stop signals: they leave SIGTERM and Ctrl-C to the trainer.

Schedulers (SLURM, GCE) signal every process of a job and a terminal's Ctrl-C reaches the
whole foreground group, so Grain's worker processes get the signals the trainer turns into
"save and stop" (`resnet_jax.preemption`). They ignore them (`init_input_worker`): the
trainer decides, and stops them as it closes its pipelines; each ends when its parent
does, so neither the second Ctrl-C's immediate stop nor a trainer killed outright
(SIGKILL, out of memory) leaves one behind. They are started with the signals blocked
(`stop_signals_held`), so that none arriving before they ignore them can end them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals_held():
    """Within: SIGTERM and SIGINT are blocked in the calling thread, and so in the threads and
    processes it starts (they inherit its signal mask, through fork and exec); they reach the
    process's other threads as before (the trainer's watching thread), so none is lost. Start
    input workers inside, with `init_input_worker` as their first act. (CPython starts its
    own resource tracker process this way.)"""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def init_input_worker(*worker) -> None:
    """An input worker process's first act (Grain's `worker_init_fn`, given the worker's index
    and count): ignore SIGTERM and SIGINT, then unblock them (any that arrived while they
    were blocked is dropped); and end when the training process does, however it ends."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()


def _exit_with_parent() -> None:
    multiprocessing.parent_process().join()  # returns once the parent process has ended
    os._exit(1)
