"""Which way to compute each part of a convolution, measured once on the CPU at hand.

How fast each formulation of a convolution's forward pass, input gradient or weight
gradient runs depends on the CPU (its vector width and core count), on the layer's shape
and on the build of the native kernels, and the order changes between CPUs: on one the
native kernels win every part of ResNet-20's layers, on another XLA's own convolutions
or the shifted-einsum weight gradient win (`benchmarks/RESULTS.md`). No rule written in
advance holds on a CPU nobody measured, so `choose` times the candidates the first time a
(part, shape) is met and keeps the fastest in a cache file, from which every later choice
is read: given the cache, the choice, and with it the result's rounding, is fixed. Keys
name the candidates too, so a choice made among others (no native kernels) is not reused.

The cache is `$XDG_CACHE_HOME/resnet_jax/conv_choices-DIGEST.json` (default
`~/.cache/resnet_jax`), DIGEST hashing what the timings depend on: the CPU's model and
flags, the cores this process may use, the native kernels' build, the jax and jaxlib
versions and `$XLA_FLAGS`. Delete the file to measure again. Each measurement compiles
every candidate alone and times `ROUNDS` calls of each, interleaved (a change in the
machine's load hits all candidates alike); the median wins, the first listed on a tie.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jaxlib
import numpy as np

from resnet_jax.cpu import native_conv

# Timed calls of each candidate, after one untimed warm-up call.
ROUNDS = 5

_log = logging.getLogger(__name__)
# A candidate: the function computing the part, and the shapes and dtypes of its arguments.
Candidate = tuple[Callable, Sequence[jax.ShapeDtypeStruct]]


def choose(key: str, candidates: dict[str, Candidate], compiler_options: dict[str, str]) -> str:
    """The name of the fastest of `candidates` for what `key` names (a part of a
    convolution of some shape): read from the cache, else measured now and cached.
    `compiler_options`: those to compile each candidate with, as its real use is."""
    names = list(candidates)
    if len(names) == 1:
        return names[0]
    path = cache_path()
    known = _read(path).get(key)
    if known is not None:
        return known["choice"]
    times = measure(candidates, compiler_options)
    choice = min(names, key=lambda name: (times[name], names.index(name)))
    _log.info("resnet_jax: %s: %s (ms: %s)", key, choice, times)
    return _add(path, key, {"choice": choice, "ms": times})["choice"]


def measure(candidates: dict[str, Candidate], compiler_options: dict[str, str]) -> dict[str, float]:
    """Median milliseconds of `ROUNDS` interleaved calls of each candidate on random inputs.

    Runs now, also while a computation is being traced: compiled executables and
    arrays made under `ensure_compile_time_eval` are not staged into the trace.
    """
    rng = np.random.default_rng(0)
    compiled, inputs = {}, {}
    for name, (fn, specs) in candidates.items():
        compiled[name] = jax.jit(fn, compiler_options=compiler_options).lower(*specs).compile()
        with jax.ensure_compile_time_eval():
            inputs[name] = [jax.device_put(rng.standard_normal(s.shape).astype(s.dtype)) for s in specs]
        jax.block_until_ready(compiled[name](*inputs[name]))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(ROUNDS):
        for name in candidates:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*inputs[name]))
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(values) * 1e3, 4) for name, values in times.items()}


def cache_path() -> pathlib.Path:
    """This CPU's, build's and versions' cache file."""
    return native_conv.cache_dir() / f"conv_choices-{_digest()}.json"


@functools.cache
def _digest() -> str:
    library = native_conv.library()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count()
    digest = hashlib.sha256()
    for part in (native_conv.cpu_description(), f"cores {cores}", library.name if library else "no kernels",
                 f"jax {jax.__version__} jaxlib {jaxlib.__version__}", os.environ.get("XLA_FLAGS", "")):
        digest.update(hashlib.sha256(part if isinstance(part, bytes) else part.encode()).digest())
    return digest.hexdigest()[:16]


def _read(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # unreadable or damaged: measured again, rewritten
        _log.warning("resnet_jax: ignoring the convolution choices in %s (%s)", path, error)
        return {}


def _add(path: pathlib.Path, key: str, entry: dict) -> dict:
    """Adds `entry` under `key` unless another process added one first; returns the one kept.

    Written under a temporary name and renamed: a reader never sees half a file. Two
    processes adding different keys at once may drop one of them, which is then measured
    again; a key once written is never changed.
    """
    entries = _read(path)
    entry = entries.setdefault(key, entry)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
            json.dump(entries, file, indent=1, sort_keys=True)
        os.replace(file.name, path)
    except OSError as error:  # a read-only cache: choose again next time
        _log.warning("resnet_jax: cannot save the convolution choices to %s (%s)", path, error)
    return entry
