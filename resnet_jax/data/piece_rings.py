"""Pieces handed from the input workers to the training process through shared-memory rings
mapped once, rather than a fresh shared-memory block per piece.

A fresh block costs the worker new pages (zeroed by the kernel) and the training process a
look-up of every 4 KiB page as it copies the piece out, then the freeing of them all: on
the CPUs measured that is most of the training process's time per example
(benchmarks/RESULTS.md, the pre-decoded ceiling). Here each worker process writes its
pieces into slots of its own ring, created at its first piece and mapped by the training
process once; only a small token crosses through Grain's queue (the ring's name, the
piece's number and the arrays' layout), and the training process copies the slot straight
into its batch buffer, then counts the piece as consumed in the ring's header.

Worker `w` of `W` gets pieces w, w + W, ... (Grain hands each worker every W-th element of
the dataset), so piece `i` is number i // W of its worker, in slot (i // W) % slots. A
worker waits before writing a slot until the piece that held it was consumed: it never
overwrites a piece not yet copied, however far ahead it runs. A piece larger than a slot
(a multi-scale evaluation's wider canvases than its first piece's) crosses as before, in
a block of its own.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory

import jax
import numpy as np

# The ring's header: the count of pieces the training process has consumed (int64), then
# padding so that slots start on a cache line.
_HEADER = 64
_ALIGN = 64
# How long a worker sleeps between looks at a full ring's header.
_WAIT = 0.0005


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


class RingWriter:
    """Grain's `map_with_index` over a dataset of pieces, run in worker `index % workers`:
    piece -> its token (`RingReader.copy`), the piece written to this worker's ring of
    `slots` slots."""

    def __init__(self, workers: int, slots: int):
        self.workers, self.slots = workers, slots
        self._ring, self._slot_bytes, self._worker = None, 0, None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # what crosses to the workers: the plan, not a ring
        return {"workers": self.workers, "slots": self.slots}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["workers"], state["slots"])

    def _open(self, worker: int, slot_bytes: int) -> shared_memory.SharedMemory:
        with self._lock:
            if self._worker is None:
                self._worker = worker
                self._slot_bytes = slot_bytes
                self._ring = shared_memory.SharedMemory(create=True, size=_HEADER + self.slots * slot_bytes)
            elif worker != self._worker:  # the hand-out of elements to workers is not Grain's of today
                raise RuntimeError(f"input worker {self._worker} of {self.workers} was given piece of "
                                   f"worker {worker}: pieces cannot be numbered per worker")
            return self._ring

    def __call__(self, index: int, piece):
        leaves, treedef = jax.tree_util.tree_flatten(piece)
        leaves = [np.ascontiguousarray(leaf) for leaf in leaves]
        sizes = [_aligned(leaf.nbytes) for leaf in leaves]
        number = index // self.workers
        ring = self._open(index % self.workers, sum(sizes))
        if sum(sizes) > self._slot_bytes:
            return {"number": number, "ring": ring.name, "piece": piece}
        while struct.unpack_from("q", ring.buf, 0)[0] <= number - self.slots:  # slot still unread
            time.sleep(_WAIT)
        offset = _HEADER + (number % self.slots) * self._slot_bytes
        layout = []
        for leaf, size in zip(leaves, sizes, strict=True):
            np.ndarray(leaf.shape, leaf.dtype, ring.buf, offset)[...] = leaf
            layout.append((leaf.shape, leaf.dtype.str, offset))
            offset += size
        return {"number": number, "ring": ring.name, "layout": tuple(layout), "treedef": treedef}


class RingReader:
    """The training process's side: tokens -> pieces copied into batch buffers; the rings
    mapped at their first token, and unlinked at once (the mappings keep them until
    `close()`)."""

    def __init__(self):
        self._rings: dict[str, shared_memory.SharedMemory] = {}

    def _ring(self, name: str) -> shared_memory.SharedMemory:
        ring = self._rings.get(name)
        if ring is None:
            ring = self._rings[name] = shared_memory.SharedMemory(name)
            ring.unlink()  # its name is no longer needed: nothing is left behind in /dev/shm
        return ring

    def leaves(self, token: dict) -> tuple[list, object, Callable[[], None]]:
        """(leaves, treedef, done) of the piece of `token`: the leaves are views of its slot,
        valid until `done()` marks the piece consumed (then the worker may overwrite it)."""
        ring = self._ring(token["ring"])
        if "piece" in token:  # crossed in a block of its own
            leaves, treedef = jax.tree_util.tree_flatten(token["piece"])
        else:
            leaves = [np.ndarray(shape, np.dtype(dtype), ring.buf, offset)
                      for shape, dtype, offset in token["layout"]]
            treedef = token["treedef"]
        return leaves, treedef, lambda: struct.pack_into("q", ring.buf, 0, token["number"] + 1)

    def close(self) -> None:
        for ring in self._rings.values():
            try:
                ring.close()
            except BufferError:  # a view of it is still referenced: the mapping goes with it
                pass
        self._rings.clear()


def is_token(piece) -> bool:
    return isinstance(piece, dict) and "ring" in piece and "number" in piece

