"""Let the host allocator keep and reuse XLA:CPU's per-step scratch memory.

XLA:CPU allocates all the temporaries of one execution of a computation as a single
block (hundreds of MB for ResNet-20's training step at batch 128), from the thread that
runs it, and frees it at the end. glibc serves a block that large from a fresh `mmap` in
that thread's arena and unmaps it when freed, so every step faults in and zeroes the
block's pages anew, a large part of a CPU step (the measurement, with and without this
setting, is in `benchmarks/RESULTS.md`; `tests/test_allocator.py` counts the faults).
PyTorch does not pay this: it allocates per tensor, in sizes glibc reuses.

`keep_freed_memory()` makes every thread allocate from glibc's main heap, never through
`mmap`, and never trims the heap, so the next step reuses the block as it is. It is
process-wide: the process keeps its peak memory rather than returning it to the system.
It must run before JAX starts its threads (before the first use of a device) to reach
them; the commands and the benchmarks call it first thing, through
`backend.keep_freed_memory_on_cpu`, and only where JAX will run on the CPU. Elsewhere than
glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # bytes of free memory at the heap's top before it is returned


@functools.cache
def keep_freed_memory() -> bool:
    """Configure glibc's allocator as described above; whether it was (glibc present)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: AttributeError elsewhere)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    applied = [mallopt(param, value) == 1 for param, value in settings]  # each, even if one fails
    return all(applied)
