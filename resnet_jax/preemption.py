"""Stopping a run cleanly: SIGTERM (what TPU and GPU schedulers send before preemption) and
Ctrl-C (SIGINT) become "save the current step and stop"; a second Ctrl-C stops at once.

One process watches for the signals itself. Several processes must stop at the same step
(or the others would wait in a collective forever), so there Orbax's preemption sync
point, which agrees on a step through JAX's distributed runtime, decides on SIGTERM, and
Ctrl-C keeps Python's default.

Why a thread reads the signals: Python runs a signal handler in the main thread between
two bytecodes, so while XLA compiles (seconds to minutes inside one C++ call) a handler
would wait, and a second Ctrl-C could not stop the process; the default handler's
KeyboardInterrupt, raised as compilation returned, crashed the process. Python's own
C-level handler writes each signal's number to the wakeup file descriptor the moment it
arrives (`signal.set_wakeup_fd`); a thread reading it acts then, compilation or not.

Input worker processes (Grain's) get the same signals, since schedulers (SLURM, GCE) signal
every process of the job and a terminal's Ctrl-C the whole foreground group; they ignore
them and leave the decision to this process (`data/input_workers.py`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

import jax

from resnet_jax.data.input_workers import STOP_SIGNALS

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

    from resnet_jax import checkpoint

# What a shell reports for a process that Ctrl-C ended: 128 + SIGINT.
ABORTED_EXIT_STATUS = 128 + signal.SIGINT


def _leave_to_the_watcher(signum, frame) -> None:
    """The Python-level handler: the watching thread has already acted on the signal."""


class PreemptionWatcher:
    """`with PreemptionWatcher() as watcher: ... if watcher.reached(step, mngr): save; stop`."""

    def __init__(self):
        self._signalled = threading.Event()
        self.stopped_by = "preempted"  # how the run's last line names the stop: "interrupted" for Ctrl-C
        self._mngr: checkpoint.Manager | None = None
        self._previous_handlers: dict[int, object] = {}
        self._previous_wakeup_fd = -1
        self._wakeup_write_fd: int | None = None

    def __enter__(self) -> PreemptionWatcher:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            read_fd, self._wakeup_write_fd = os.pipe()
            os.set_blocking(self._wakeup_write_fd, False)
            self._previous_wakeup_fd = signal.set_wakeup_fd(self._wakeup_write_fd, warn_on_full_buffer=False)
            for signum in STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, _leave_to_the_watcher)
            threading.Thread(target=self._watch, args=(read_fd,), name="stop-signals", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._wakeup_write_fd is None:
            return
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._wakeup_write_fd)  # the watching thread reads the pipe's end and returns

    def _watch(self, read_fd: int) -> None:
        interrupts = 0
        with os.fdopen(read_fd, "rb", buffering=0) as wakeups:
            while signums := wakeups.read(64):
                for signum in signums:
                    if signum == signal.SIGINT:
                        interrupts += 1
                        self.stopped_by = "interrupted"
                        if interrupts > 1:
                            _abort(self._mngr)
                        print("\ninterrupted: saving a checkpoint of the current step, then stopping "
                              "(Ctrl-C again stops at once, without saving it)", file=sys.stderr, flush=True)
                    if signum in STOP_SIGNALS:
                        self._signalled.set()

    def watch_checkpoints(self, mngr: checkpoint.Manager) -> None:
        """The run's checkpoints, so that a second Ctrl-C says where a rerun resumes."""
        self._mngr = mngr

    def reached(self, step: int, mngr: ocp.CheckpointManager) -> bool:
        if jax.process_count() > 1:
            return mngr.reached_preemption(step)
        return self._signalled.is_set()


def _abort(mngr: checkpoint.Manager | None) -> None:
    """The second Ctrl-C: end the process now (its input workers, which ignore the signal, end
    with it), saying where a rerun resumes."""
    print(f"\ninterrupted again: stopped at once; {rerun_hint(mngr)}", file=sys.stderr, flush=True)
    os._exit(ABORTED_EXIT_STATUS)


def rerun_hint(mngr: checkpoint.Manager | None) -> str:
    """Where a rerun resumes, by `mngr`'s saves (None: the workdir is not read yet). A save in
    flight never counts (Orbax commits a checkpoint by renaming it into place), so the last
    finished one, if any, is where a rerun resumes; of a save under way only the next save
    or a wait would tell that it has finished."""
    if mngr is None:  # still setting up: the workdir's checkpoints are not read yet
        return "rerun the same command to resume from the run's last checkpoint, if it has one"
    if mngr.unfinished_step is not None:
        before = f"from that of step {mngr.finished_step}" if mngr.finished_step else "from scratch"
        return (f"rerunning the same command resumes from the checkpoint of step {mngr.unfinished_step} "
                f"if its save had finished, else {before}")
    if mngr.finished_step is None:
        return "no checkpoint was saved yet, so rerunning the same command starts from scratch"
    return f"rerun the same command to resume from the checkpoint of step {mngr.finished_step}"
