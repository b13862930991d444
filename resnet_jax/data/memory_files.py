"""Anonymous memory files (Linux `memfd_create`) that the processes of one host share by
reference: the creating process keeps the file open, and another opens it as
`/proc/<pid>/fd/<fd>` once it has checked that the descriptor still names the same file
(its device and inode), then maps it.

Such a file has no name in any file system, so there is nothing to remove however a
process ends (the run's end, Ctrl-C, SIGTERM, SIGKILL, out of memory): the kernel frees
it with the last process that holds it open or mapped. A named block (/dev/shm,
`multiprocessing.shared_memory`) outlives a process killed outright, and its size is
bounded by /dev/shm's (a container's default is 64 MiB), where a memory file's is bounded
only by the host's memory. Without `memfd_create` (macOS) `AVAILABLE` is False and the
callers pass their data some other way.
"""

from __future__ import annotations

import mmap
import os

from resnet_jax.data.sources import DataError

AVAILABLE = hasattr(os, "memfd_create")


def create(name: str, size: int, sealable: bool = False) -> tuple[int, tuple[int, int, int, int]]:
    """(descriptor, reference) of a new zero-filled memory file of `size` bytes (at least
    one: mmap needs a byte), named `name` in /proc/<pid>/maps; the reference (pid, fd,
    device, inode) is what another process `open_mapped`s. The caller closes the
    descriptor, after which the reference no longer opens."""
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
    fd = os.memfd_create(name, flags)
    os.ftruncate(fd, max(size, 1))
    stat = os.fstat(fd)
    return fd, (os.getpid(), fd, stat.st_dev, stat.st_ino)


def mapped(fd: int, size: int, writable: bool) -> mmap.mmap:
    """`size` bytes of file `fd`, shared with every process that maps it (the mapping holds
    a descriptor of its own: `fd` may be closed)."""
    return mmap.mmap(fd, max(size, 1), prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))


def open_mapped(reference: tuple[int, int, int, int], size: int, writable: bool, what: str) -> mmap.mmap:
    """The memory file of `reference` (`create`) in another process of this host, mapped;
    a `DataError` naming `what` if that process no longer holds it."""
    pid, fd, device, inode = reference
    path = f"/proc/{pid}/fd/{fd}"
    try:
        opened = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as error:
        raise DataError(f"{path}: cannot open the {what} process {pid} shares ({error}); it is "
                        "readable on its host while that process runs") from None
    try:
        stat = os.fstat(opened)
        if (stat.st_dev, stat.st_ino) != (device, inode):
            raise DataError(f"{path}: no longer the {what} process {pid} shared (it closed it)")
        return mapped(opened, size, writable)
    finally:
        os.close(opened)
