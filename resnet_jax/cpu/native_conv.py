"""Native CPU convolution kernels (`native/conv_cpu.cc`), called from XLA through its FFI.

XLA:CPU's Eigen convolutions run ResNet's narrow layers (16 channels) and its weight
gradients well below the CPU's peak; these direct kernels keep a tile of outputs in
vector registers instead, with tile shapes chosen at compile time for the target's
vector width and register count (AVX-512, AVX2, SSE). Where they are faster than XLA's
on the CPU at hand is measured, not assumed: `fast_conv` offers them as one candidate
per part of a convolution where `supported` says they apply, and `conv_choice` keeps
them only where they win (`benchmarks/RESULTS.md` has the figures).

The kernels are compiled from source the first time they are needed, with the C++
compiler named by `$CXX` (default `g++`) for the CPU named by `$RESNET_JAX_NATIVE_MARCH`
(g++'s `-march`; default `native`, this CPU; `x86-64-v3` builds the AVX2 code on any
x86-64 CPU that has it), into `$XDG_CACHE_HOME/resnet_jax` (default
`~/.cache/resnet_jax`), under a name that hashes the source, the flags, the compiler,
JAX's FFI headers and the CPU, so a changed one is rebuilt rather than reused. Without a
compiler, or if the build fails, the kernels are unavailable: a warning says why, and
XLA's convolutions run instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).parent / "native" / "conv_cpu.cc"
FLAGS = ("-O3", "-std=gnu++17", "-shared", "-fPIC", "-w")
# The CPU the kernels are compiled for (g++'s -march): this one by default.
MARCH_VARIABLE = "RESNET_JAX_NATIVE_MARCH"
# The FFI targets, as the handlers are named in the source.
_TARGETS = {"resnet_jax_conv_forward": "ResnetJaxConvForward",
            "resnet_jax_conv_weight_grad": "ResnetJaxConvWeightGrad"}
# Output channels come in whole vectors of every width the kernels are built for.
CHANNEL_MULTIPLE = 16
# The kernels stream the kernel from the L2 cache for every tile of pixels: larger ones
# (ResNet-50's from conv4_x on) ran at or below XLA's speed (`benchmarks/RESULTS.md`), and
# measuring them would only lengthen the first run.
MAX_KERNEL_BYTES = 1 << 20

_log = logging.getLogger(__name__)


def supported(x: jax.Array, kernel_shape: Sequence[int], pads: Sequence[tuple[int, int]]) -> bool:
    """Whether the native kernels compute the convolution of `x` with an HWIO kernel of
    `kernel_shape` and padding `pads` (and its weight gradient): float32, no empty array,
    output channels a multiple of 16, a kernel under `MAX_KERNEL_BYTES`, padding of zero
    or more, on a single CPU device, with the kernels built.

    Single device only: XLA cannot partition a custom call over a mesh, so on several
    devices it would gather the whole batch onto each one.
    """
    return (
        x.dtype == jnp.float32 and kernel_shape[3] % CHANNEL_MULTIPLE == 0 and x.size > 0
        and 0 < math.prod(kernel_shape) * x.dtype.itemsize < MAX_KERNEL_BYTES
        and all(lo >= 0 and hi >= 0 for lo, hi in pads)
        and jax.default_backend() == "cpu" and jax.device_count() == 1 and available()
    )


def forward(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
            pads: Sequence[tuple[int, int]]) -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, strides, pads)` for NHWC `x`, HWIO `kernel`."""
    out_shape = (
        x.shape[0],
        *((size + lo + hi - k) // s + 1
          for size, (lo, hi), k, s in zip(x.shape[1:3], pads, kernel.shape[:2], strides, strict=True)),
        kernel.shape[3],
    )
    return _call("resnet_jax_conv_forward", out_shape, x, kernel, strides, pads)


def weight_grad(x: jax.Array, grad_out: jax.Array, kernel_shape: Sequence[int], strides: Sequence[int],
                pads: Sequence[tuple[int, int]]) -> jax.Array:
    """The gradient wrt the HWIO kernel of that convolution, given the output gradient."""
    return _call("resnet_jax_conv_weight_grad", tuple(kernel_shape), x, grad_out, strides, pads)


def _call(target: str, out_shape: tuple, a: jax.Array, b: jax.Array, strides, pads) -> jax.Array:
    # The trailing padding is implied by the output's size.
    (pad_h, _), (pad_w, _) = pads
    return jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential"
    )(a, b, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
      pad_h=np.int64(pad_h), pad_w=np.int64(pad_w))


def available() -> bool:
    """Whether the kernels are built (building them now if need be) and registered with XLA."""
    return library() is not None


@functools.cache
def library() -> pathlib.Path | None:
    """The built kernels' file, registered with XLA; None (and a warning) if they cannot be built."""
    try:
        path = _build()
        handle = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as error:
        detail = getattr(error, "stderr", "") or ""
        _log.warning("resnet_jax: native CPU convolutions unavailable, using XLA's (%s) %s",
                     error, detail[-2000:])
        return None
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
    return path


def cache_dir() -> pathlib.Path:
    """Where the built kernels (and `conv_choice`'s measurements, and by default
    `compile_cache`'s compiled programs) are kept."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "resnet_jax"


def _build() -> pathlib.Path:
    """The compiled library, compiling it first if this source, compiler and CPU have none."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise FileNotFoundError(f"no C++ compiler {os.environ.get('CXX', 'g++')!r} on the PATH (set $CXX)")
    include = jax.ffi.include_dir()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    flags = (*FLAGS, f"-march={os.environ.get(MARCH_VARIABLE) or 'native'}")
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(), cpu_description(),
                 (pathlib.Path(include) / "xla" / "ffi" / "api" / "c_api.h").read_bytes()):
        digest.update(hashlib.sha256(part).digest())
    cache = cache_dir()
    target = cache / f"conv_cpu-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    _log.info("resnet_jax: compiling the native CPU convolutions into %s", target)
    # Built under a temporary name and renamed: concurrent processes never load half a file.
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = pathlib.Path(scratch) / target.name
        subprocess.run([compiler, *flags, f"-I{include}", str(SOURCE), "-o", str(built)],
                       capture_output=True, text=True, check=True)
        os.replace(built, target)
    return target


def cpu_description() -> bytes:
    """The CPU's model and feature flags: what `-march=native` compiles for."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))})).encode()
