"""JAX's persistent compilation cache: compiled steps kept on disk, so that a rerun, a
resumed run or an evaluation of the same model loads them rather than compiling again.

The config key `compilation_cache_dir` names the directory: "auto" (the default) is
`$XDG_CACHE_HOME/resnet_jax/xla` (default `~/.cache/resnet_jax/xla`), "" turns the cache
off, anything else is the directory itself. A user cache rather than the workdir, because
what is compiled depends on the model, batch and devices, not on the run: a new workdir
(another seed, a rerun, an evaluation) reuses what an earlier run compiled; a workdir may
be on object storage, where every entry would be a remote round trip at start-up; and the
native convolution kernels and the convolution choices the compiled steps embed already
live beside it (`resnet_jax/cpu/`). JAX keys every entry by the traced program, the
compiler options, the devices and the jax and jaxlib versions, so a changed one compiles
anew.

Executables that call the native CPU convolutions (XLA FFI custom calls) load from the
cache like any other: their targets are registered when the step is traced
(`native_conv.supported`), which precedes the cache look-up, the key being the traced
program; with `model.conv=auto` that program also carries the convolution choices,
so a changed choice is a different entry.

JAX reads the setting at a process's first compilation and keeps it for the process:
`enable` runs before train.py's and evaluate.py's first one.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from resnet_jax import backend

AUTO = "auto"
# Programs that compile faster than this are not written: the many small ones (a random
# split, an elementwise op) would cost more files than they save time. JAX's own default,
# 1 s, would leave out the eval step of the small nets, which compiles in under a second on
# a 2-core CPU (measured: benchmarks/RESULTS.md, "Compiling the small nets' eval step").
MIN_COMPILE_SECONDS = 0.2


def directory(setting: str) -> Path | None:
    """The cache directory a `compilation_cache_dir` value names; None for "" (off)."""
    if not setting:
        return None
    if setting == AUTO:
        return Path(backend.user_cache_dir()) / "xla"
    return Path(os.path.expanduser(setting))


def enable(setting: str) -> Path | None:
    """Point JAX's persistent compilation cache at `directory(setting)` (or turn it off),
    for every compilation of this process from the first on; the directory, or None."""
    path = directory(setting)
    jax.config.update("jax_compilation_cache_dir", None if path is None else str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
