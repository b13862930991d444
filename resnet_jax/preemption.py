"""Preemption: SIGTERM, what TPU and GPU schedulers send, becomes "save now and stop".

One process watches for the signal itself. Several processes must stop at the same step
(or the others would wait in a collective forever), so there Orbax's preemption sync
point, which agrees on a step through JAX's distributed runtime, decides.
"""

from __future__ import annotations

import signal
import threading

import jax
import orbax.checkpoint as ocp


class PreemptionWatcher:
    """`with PreemptionWatcher() as watcher: ... if watcher.reached(step, mngr): save; stop`."""

    def __init__(self):
        self._signalled = threading.Event()
        self._previous = None

    def __enter__(self) -> PreemptionWatcher:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._signalled.set())
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int, mngr: ocp.CheckpointManager) -> bool:
        if jax.process_count() > 1:
            return mngr.reached_preemption(step)
        return self._signalled.is_set()
