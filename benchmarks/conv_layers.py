"""Per-layer timings of every formulation of each part of a convolution: the evidence for "auto".

    python benchmarks/conv_layers.py [--layers=cifar|imagenet] [--reps=7] [--context=jit|scan]
    RESNET_JAX_NATIVE_MARCH=x86-64-v3 python benchmarks/conv_layers.py   # the AVX2 kernels

For every distinct convolution shape of the CIFAR ResNets (batch 128) or of ResNet-50
(batch 8), and for each part (forward pass, gradient wrt the input, gradient wrt the
kernel), times `conv="xla"` (`lax.conv_general_dilated` and JAX's own gradient, compiled
with its path's options) and each formulation `fast_conv.candidates` offers for the
layer (compiled as "auto" compiles them), either as a plain jitted function or inside a
`lax.scan` body, where a multi-step dispatch runs them. Every variant of a row is
compiled first, then called `reps` times in turn (interleaved: a change in the machine's
load hits all of them alike); one markdown row per layer and part gives each median in
milliseconds, the fastest formulation's speed-up over "xla", and what "auto" runs there
(`fast_conv.choice`: read from this CPU's cache, or measured now and cached).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax.backend import keep_freed_memory_on_cpu
from resnet_jax.cpu import native_conv
from resnet_jax.cpu.fast_conv import PARTS, candidates, choice, compiler_options

# (batch, size, in channels, out channels, kernel, stride): every distinct shape.
LAYERS = {
    "cifar": [
        (128, 32, 3, 16, 3, 1), (128, 32, 16, 16, 3, 1), (128, 32, 16, 32, 3, 2),
        (128, 16, 32, 32, 3, 1), (128, 16, 32, 64, 3, 2), (128, 8, 64, 64, 3, 1),
    ],
    "imagenet": [
        (8, 224, 3, 64, 7, 2), (8, 56, 64, 64, 1, 1), (8, 56, 64, 64, 3, 1), (8, 56, 64, 256, 1, 1),
        (8, 56, 256, 64, 1, 1), (8, 56, 256, 512, 1, 2), (8, 28, 128, 128, 3, 2), (8, 7, 512, 512, 3, 1),
    ],
}
NAMES = ("conv", "xla", "space_to_depth", "shifted", "native")  # every formulation's column
_CANONICAL = ("NHWC", "HWIO", "NHWC")


def xla_part(part: str, x_shape, kernel_shape, strides, pads):
    """`part` as conv="xla" computes it (JAX's own gradients), with `formulation`'s arguments."""
    def conv(x, kernel):
        return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_CANONICAL)

    if part == "forward":
        return conv
    if part == "input_grad":
        return lambda grad_out, kernel: jax.vjp(lambda x: conv(x, kernel), jnp.zeros(x_shape))[1](grad_out)[0]
    return lambda x, grad_out: jax.vjp(lambda k: conv(x, k), jnp.zeros(kernel_shape))[1](grad_out)[0]


def in_scan_body(f):
    return lambda *args: lax.scan(lambda carry, _: (carry, f(*args)), 0, length=1)[1][0]


def interleaved_medians(fns: dict, args, reps: int) -> dict[str, float]:
    for f in fns.values():
        jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="cifar", choices=tuple(LAYERS))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--context", default="jit", choices=("jit", "scan"))
    args = p.parse_args()
    keep_freed_memory_on_cpu()  # as train.py does: no page faults on fresh outputs
    rng = np.random.default_rng(0)
    library = native_conv.library()
    print(f"jax {jax.__version__}, {platform.processor() or platform.machine()}, native kernels: "
          f"{library.name if library else 'unavailable'}; median ms of {args.reps} interleaved calls, "
          f"{args.context} context")
    print("| batch, size, in -> out, kernel/stride | part | XLA (conv=\"xla\") | "
          + " | ".join(NAMES) + " | fastest vs XLA | auto runs |")
    print("|---|---|---|" + "---|" * len(NAMES) + "---|---|")
    for batch, size, c_in, c_out, kernel, stride in LAYERS[args.layers]:
        strides, pads = (stride, stride), ((kernel // 2, kernel // 2),) * 2
        x, w = (jax.ShapeDtypeStruct(shape, jnp.float32)
                for shape in ((batch, size, size, c_in), (kernel, kernel, c_in, c_out)))
        out = (size + 2 * (kernel // 2) - kernel) // stride + 1
        arrays = {shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
                  for shape in (x.shape, w.shape, (batch, out, out, c_out))}
        for part in PARTS:
            operands = {"forward": (x.shape, w.shape), "input_grad": ((batch, out, out, c_out), w.shape),
                        "weight_grad": (x.shape, (batch, out, out, c_out))}[part]
            part_args = tuple(arrays[shape] for shape in operands)
            wrap = in_scan_body if args.context == "scan" else (lambda f: f)
            fns = {"XLA": jax.jit(wrap(xla_part(part, x.shape, w.shape, strides, pads)),
                                  compiler_options=compiler_options("xla"))}
            for name, fn in candidates(part, x, w, strides, pads).items():
                fns[name] = jax.jit(wrap(fn), compiler_options=compiler_options("auto"))
            ms = interleaved_medians(fns, part_args, args.reps)
            fastest = min((name for name in fns if name != "XLA"), key=ms.get)
            cells = [f"{ms[name]:.1f}" if name in ms else "" for name in NAMES]
            print(f"| {batch}, {size}x{size}, {c_in} -> {c_out}, {kernel}x{kernel}/{stride} | {part} | "
                  f"{ms['XLA']:.1f} | " + " | ".join(cells)
                  + f" | {ms['XLA'] / ms[fastest]:.2f}x ({fastest}) | {choice(part, x, w, strides, pads)} |",
                  flush=True)


if __name__ == "__main__":
    main()
