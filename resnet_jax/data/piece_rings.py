"""Pieces handed from the input workers to the training process through rings of slots
in anonymous memory files, mapped once, rather than a fresh shared-memory block per piece.

A fresh block costs the worker new pages (zeroed by the kernel) and the training process a
look-up of every 4 KiB page as it copies the piece out, then the freeing of them all: on
the CPU measured that was most of the training process's time per example
(benchmarks/RESULTS.md, the pre-decoded ceiling). Here each worker process writes its
pieces into the slots of its own ring, a memory file (`memory_files`) it creates at its
first piece and the training process maps at the first token from it; only a small token
crosses through Grain's queue (the piece's number and worker, the ring's reference, the
arrays' layout), and the training process copies the slot straight into its batch
buffer, then counts the piece as consumed in its control block (one per `HostBatches`, a
memory file of the training process that the workers map read-only). None of these has a
name in /dev/shm: they take none of its space (a container's default is 64 MiB, less
than one worker's ring at 224x224), and nothing is left behind however the processes end.

Worker `w` of `W` gets pieces w, w + W, ... (Grain hands each worker every W-th element of
the dataset; a worker given another's piece stops with an error), so piece `i` is number
i // W of worker i % W, in slot (i // W) % slots of its ring. A worker waits before
writing a slot until the piece that held it was consumed, so it never overwrites a piece
not yet copied, however far ahead it runs; once the training process closes, none waits
(it reads no more pieces). A slot holds a piece of the size given (the largest the
pipeline makes) or, without one, of the worker's first piece; a larger piece crosses in a
block of its own, as Grain passes any array (through /dev/shm). `AVAILABLE`: without
memory files (macOS) the workers' pieces all cross as Grain's own blocks.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from resnet_jax.data import memory_files

AVAILABLE = memory_files.AVAILABLE
_ALIGN = 64  # slots and arrays start on cache lines
# How long a worker sleeps between looks at a full ring's count.
_WAIT = 0.0005


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def slot_bytes(example: Any, piece: int) -> int:
    """The bytes of a slot holding a piece of `piece` examples like `example`."""
    return sum(_aligned(piece * np.asarray(leaf).nbytes) for leaf in jax.tree_util.tree_leaves(example))


def ring_bytes(example: Any, piece: int, slots: int) -> int:
    """The memory of one worker's ring of `slots` slots (`slot_bytes`), in whole pages."""
    return -(-slots * slot_bytes(example, piece) // mmap.PAGESIZE) * mmap.PAGESIZE


class RingWriter:
    """Grain's `map_with_index` over a dataset of pieces, run in worker `index % workers`:
    piece -> its token (`RingReader.leaves`), the piece written to this worker's ring of
    `slots` slots of `slot_size` bytes (None: its first piece's). The training process's
    control block (`control`, a `memory_files` reference) holds whether it has closed
    (int64) and each worker's count of consumed pieces (int64 each)."""

    def __init__(self, control: tuple, workers: int, slots: int, slot_size: int | None = None):
        self.control, self.workers, self.slots, self.slot_size = control, workers, slots, slot_size
        self._control, self._ring, self._reference, self._worker = None, None, None, None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # what crosses to the workers: the plan, no mapping
        return {"control": self.control, "workers": self.workers, "slots": self.slots,
                "slot_size": self.slot_size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _closed(self) -> bool:
        return struct.unpack_from("q", self._control, 0)[0] != 0

    def _consumed(self) -> int:
        return struct.unpack_from("q", self._control, 8 * (1 + self._worker))[0]

    def _open_ring(self, worker: int, piece_bytes: int) -> None:
        """Maps the control block and creates this worker's ring at its first piece. The
        ring's descriptor stays open while this writer lives (as long as the worker): the
        training process opens the ring through it."""
        with self._lock:
            if self._worker is None:
                self._control = memory_files.open_mapped(self.control, 8 * (1 + self.workers), writable=False,
                                                         what="training process's control block of the rings")
                self.slot_size = self.slot_size or piece_bytes
                size = self.slots * self.slot_size
                fd, reference = memory_files.create("resnet_jax-piece-ring", size)
                weakref.finalize(self, os.close, fd)
                self._ring = memory_files.mapped(fd, size, writable=True)
                self._worker, self._reference = worker, (reference, size)
            elif worker != self._worker:  # Grain no longer hands every W-th element to a worker
                raise RuntimeError(f"input worker {self._worker} of {self.workers} was given a piece of "
                                   f"worker {worker}: pieces cannot be numbered per worker")

    def __call__(self, index: int, piece):
        leaves, treedef = jax.tree_util.tree_flatten(piece)
        leaves = [np.ascontiguousarray(leaf) for leaf in leaves]
        sizes = [_aligned(leaf.nbytes) for leaf in leaves]
        number, worker = divmod(index, self.workers)
        self._open_ring(worker, sum(sizes))
        if sum(sizes) > self.slot_size:
            return {"number": number, "worker": worker, "piece": piece}  # in a block of its own
        while self._consumed() <= number - self.slots and not self._closed():  # not yet copied
            time.sleep(_WAIT)
        offset = (number % self.slots) * self.slot_size
        layout = []
        for leaf, size in zip(leaves, sizes, strict=True):
            np.ndarray(leaf.shape, leaf.dtype, self._ring, offset)[...] = leaf
            layout.append((leaf.shape, leaf.dtype.str, offset))
            offset += size
        return {"number": number, "worker": worker, "ring": self._reference, "layout": tuple(layout),
                "treedef": treedef}


class RingReader:
    """The training process's side, for `workers` workers: tokens -> pieces, each ring
    mapped (read-only) at its first token; `control` is the reference the workers map."""

    def __init__(self, workers: int):
        size = 8 * (1 + workers)
        self._control_fd, self.control = memory_files.create("resnet_jax-ring-control", size)
        self._control = memory_files.mapped(self._control_fd, size, writable=True)  # zero-filled
        self.workers = workers
        self._rings: dict[int, Any] = {}

    def _ring(self, worker: int, reference: tuple):
        ring = self._rings.get(worker)
        if ring is None:
            ring = self._rings[worker] = memory_files.open_mapped(*reference, writable=False,
                                                                  what=f"ring of input worker {worker}")
        return ring

    def leaves(self, token: dict) -> tuple[list, object, Callable[[], None]]:
        """(leaves, treedef, done) of the piece of `token`: the leaves may be views of its
        slot, valid until `done()` counts the piece consumed (the worker may then reuse it)."""
        worker = token["worker"]
        if "piece" in token:
            leaves, treedef = jax.tree_util.tree_flatten(token["piece"])
        else:
            ring = self._ring(worker, token["ring"])
            leaves = [np.ndarray(shape, np.dtype(dtype), ring, offset)
                      for shape, dtype, offset in token["layout"]]
            treedef = token["treedef"]
        return leaves, treedef, lambda: struct.pack_into("q", self._control, 8 * (1 + worker),
                                                         token["number"] + 1)

    def stop(self) -> None:
        """Tells the workers this process has closed: none waits for a slot any more. Call
        before stopping them."""
        struct.pack_into("q", self._control, 0, 1)

    def close(self) -> None:
        """Unmaps the rings and the control block; after the workers have stopped."""
        for mapping in [*self._rings.values(), self._control]:
            try:
                mapping.close()
            except BufferError:  # a view of it is still referenced: the mapping goes with it
                pass
        os.close(self._control_fd)
        self._rings.clear()
