"""Read-only numpy arrays held once by this process and mapped by its input worker
processes, instead of each getting a pickled copy: an image folder's file names.

Grain's workers are spawned processes, and each gets the training dataset pickled by a
thread of the training process, holding the GIL: ImageNet's 1.28M paths as a Python list
were 72 MiB to pickle for every worker and 139 MiB resident in each (benchmarks/RESULTS.md,
"Input workers at pod size"). `SharedArrays` pickles as a reference instead: a few numbers
per array, whatever its size.

Where the arrays live: an anonymous memory file of this process (Linux `memfd_create`),
written once and sealed against any change, which a worker opens as
`/proc/<this pid>/fd/<fd>` and maps read-only. Its pages are in memory once per training
process, shared by every process that maps them, and a worker touches only the pages it
reads. It has no name in any file system, so there is nothing to remove however the
training process ends (the run's end, Ctrl-C, SIGTERM, a second Ctrl-C's immediate exit,
SIGKILL, out of memory): the kernel frees it with the last process that holds it. A named
file (a temporary directory, /dev/shm, `multiprocessing.shared_memory`) outlives a
process killed outright, and Python's resource tracker reports such blocks "leaked" at
exit. It costs this process two file descriptors (the file and its mapping) and a worker
one (its mapping), within `pool_limits.FIXED_FDS`.

The reference holds on this host while this process lives; a worker checks that the
descriptor still names the same file (its inode) before it maps it (`memory_files`).
Without `memfd_create` (macOS) the arrays travel pickled, compact but one copy per worker.
"""

from __future__ import annotations

import fcntl
import os
import weakref

import numpy as np

from resnet_jax.data import memory_files

_ALIGN = 64  # each array starts on a cache line
_SEALS = ("F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE")


class SharedArrays:
    """Named numpy arrays, read-only: `shared["name"]`. Pickled, they are the same arrays
    mapped, not copied, in the process that unpickles them (on this host, while this
    process lives)."""

    def __init__(self, **arrays: np.ndarray):
        arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
        layout, size = [], 0
        for name, array in arrays.items():
            offset = -(-size // _ALIGN) * _ALIGN
            layout.append((name, array.dtype.str, array.shape, offset))
            size = offset + array.nbytes
        self._layout, self._size, self._file = tuple(layout), max(size, 1), None  # mmap needs a byte
        if not memory_files.AVAILABLE:
            self._arrays = arrays
            for array in arrays.values():
                array.flags.writeable = False
            return
        fd, self._file = memory_files.create("resnet_jax-shared-arrays", self._size, sealable=True)
        weakref.finalize(self, os.close, fd)
        for (_, _, _, offset), array in zip(layout, arrays.values(), strict=True):
            data = memoryview(array).cast("B")
            while data:
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
        # Sealed: no process can change or shrink what the others have mapped.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, sum(getattr(fcntl, seal) for seal in _SEALS))
        self._arrays = self._views(memory_files.mapped(fd, self._size, writable=False))

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    @property
    def nbytes(self) -> int:
        """The bytes the arrays take, once per host however many processes map them."""
        return self._size

    def _views(self, buffer) -> dict[str, np.ndarray]:
        return {name: np.frombuffer(buffer, dtype, int(np.prod(shape)), offset).reshape(shape)
                for name, dtype, shape, offset in self._layout}

    def __getstate__(self) -> dict:
        if self._file is None:
            return {"layout": self._layout, "size": self._size, "arrays": self._arrays}
        return {"layout": self._layout, "size": self._size, "file": self._file}

    def __setstate__(self, state: dict) -> None:
        self._layout, self._size = state["layout"], state["size"]
        self._file = None  # the owner closes its file, not a process that maps it
        if "arrays" in state:
            self._arrays = state["arrays"]
            return
        self._arrays = self._views(memory_files.open_mapped(state["file"], self._size, writable=False,
                                                            what="arrays"))
