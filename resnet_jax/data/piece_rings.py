"""Pieces handed from the input workers to the training process through shared-memory rings
mapped once, rather than a fresh shared-memory block per piece.

A fresh block costs the worker new pages (zeroed by the kernel) and the training process a
look-up of every 4 KiB page as it copies the piece out, then the freeing of them all: on
the CPU measured that was most of the training process's time per example
(benchmarks/RESULTS.md, the pre-decoded ceiling). Here each worker process writes its
pieces into the slots of its own ring, created at its first piece and mapped by the
training process at the first token from it; only a small token crosses through Grain's
queue (the piece's number and worker, the arrays' layout), and the training process
copies the slot straight into its batch buffer, then counts the piece as consumed in its
control block (one per `HostBatches`, created by the training process, which names the
rings after it and so can remove them all when it closes).

Worker `w` of `W` gets pieces w, w + W, ... (Grain hands each worker every W-th element of
the dataset; a worker given another's piece stops with an error), so piece `i` is number
i // W of worker i % W, in slot (i // W) % slots of its ring. A worker waits before
writing a slot until the piece that held it was consumed, so it never overwrites a piece
not yet copied, however far ahead it runs; once the training process closes, none waits.
A piece larger than a slot (a multi-scale evaluation's wider canvases than its worker's
first piece's) crosses in a block of its own, as Grain passes any array.
"""

from __future__ import annotations

import secrets
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory

import jax
import numpy as np

_ALIGN = 64  # slots and arrays start on cache lines
# How long a worker sleeps between looks at a full ring's count.
_WAIT = 0.0005


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def _open(name: str) -> shared_memory.SharedMemory | None:
    try:
        return shared_memory.SharedMemory(name)
    except FileNotFoundError:
        return None


class RingWriter:
    """Grain's `map_with_index` over a dataset of pieces, run in worker `index % workers`:
    piece -> its token (`RingReader.leaves`), the piece written to this worker's ring of
    `slots` slots. The training process's control block `prefix`_ctl holds whether it has
    closed (int64) and each worker's count of consumed pieces (int64 each); a worker that
    finds it closed hands its piece over as before, never waiting."""

    def __init__(self, prefix: str, workers: int, slots: int):
        self.prefix, self.workers, self.slots = prefix, workers, slots
        self._control, self._ring, self._slot_bytes, self._worker = None, None, 0, None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # what crosses to the workers: the plan, no mapping
        return {"prefix": self.prefix, "workers": self.workers, "slots": self.slots}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"], state["workers"], state["slots"])

    def _closed(self) -> bool:
        return struct.unpack_from("q", self._control.buf, 0)[0] != 0

    def _consumed(self) -> int:
        return struct.unpack_from("q", self._control.buf, 8 * (1 + self._worker))[0]

    def _open_ring(self, worker: int, slot_bytes: int) -> bool:
        """Maps the control block and creates this worker's ring at its first piece; False
        once the training process has closed (or its control block is gone)."""
        with self._lock:
            if self._control is None:
                self._control = _open(f"{self.prefix}_ctl")
                if self._control is None:
                    return False
            if self._worker is None:
                if self._closed():
                    return False
                self._worker, self._slot_bytes = worker, slot_bytes
                self._ring = shared_memory.SharedMemory(f"{self.prefix}_{worker}", create=True,
                                                        size=self.slots * slot_bytes)
            elif worker != self._worker:  # Grain no longer hands every W-th element to a worker
                raise RuntimeError(f"input worker {self._worker} of {self.workers} was given a piece of "
                                   f"worker {worker}: pieces cannot be numbered per worker")
            return True

    def __call__(self, index: int, piece):
        leaves, treedef = jax.tree_util.tree_flatten(piece)
        leaves = [np.ascontiguousarray(leaf) for leaf in leaves]
        sizes = [_aligned(leaf.nbytes) for leaf in leaves]
        number, worker = divmod(index, self.workers)
        own = {"number": number, "worker": worker, "piece": piece}  # in a block of its own
        if not self._open_ring(worker, sum(sizes)) or sum(sizes) > self._slot_bytes:
            return own
        while self._consumed() <= number - self.slots:  # the slot's last piece not yet copied
            if self._closed():
                return own
            time.sleep(_WAIT)
        offset = (number % self.slots) * self._slot_bytes
        layout = []
        for leaf, size in zip(leaves, sizes, strict=True):
            np.ndarray(leaf.shape, leaf.dtype, self._ring.buf, offset)[...] = leaf
            layout.append((leaf.shape, leaf.dtype.str, offset))
            offset += size
        return {"number": number, "worker": worker, "layout": tuple(layout), "treedef": treedef}


class RingReader:
    """The training process's side, for `workers` workers: tokens -> pieces; each ring
    mapped at its first token and unlinked at once (the mappings keep it until `close()`)."""

    def __init__(self, workers: int):
        self.prefix = "rj" + secrets.token_hex(6)
        self._control = shared_memory.SharedMemory(f"{self.prefix}_ctl", create=True, size=8 * (1 + workers))
        self._control.buf[:] = bytes(len(self._control.buf))
        self.workers = workers
        self._rings: dict[int, shared_memory.SharedMemory] = {}

    def _ring(self, worker: int) -> shared_memory.SharedMemory:
        ring = self._rings.get(worker)
        if ring is None:
            ring = self._rings[worker] = shared_memory.SharedMemory(f"{self.prefix}_{worker}")
            ring.unlink()  # its name is no longer needed: nothing is left behind in /dev/shm
        return ring

    def leaves(self, token: dict) -> tuple[list, object, Callable[[], None]]:
        """(leaves, treedef, done) of the piece of `token`: the leaves may be views of its
        slot, valid until `done()` counts the piece consumed (the worker may then reuse it)."""
        worker = token["worker"]
        if "piece" in token:
            leaves, treedef = jax.tree_util.tree_flatten(token["piece"])
        else:
            ring = self._ring(worker)
            leaves = [np.ndarray(shape, np.dtype(dtype), ring.buf, offset)
                      for shape, dtype, offset in token["layout"]]
            treedef = token["treedef"]
        return leaves, treedef, lambda: struct.pack_into("q", self._control.buf, 8 * (1 + worker),
                                                         token["number"] + 1)

    def stop(self) -> None:
        """Tells the workers this process has closed: none waits for a slot any more. Call
        before stopping them."""
        struct.pack_into("q", self._control.buf, 0, 1)

    def close(self) -> None:
        """Unmaps the rings (and unlinks those never mapped) and the control block; after
        the workers have stopped."""
        for worker in range(self.workers):
            if worker not in self._rings and (ring := _open(f"{self.prefix}_{worker}")) is not None:
                ring.unlink()
                ring.close()
        for ring in [*self._rings.values(), self._control]:
            try:
                ring.close()
            except BufferError:  # a view of it is still referenced: the mapping goes with it
                pass
        self._control.unlink()
        self._rings.clear()
