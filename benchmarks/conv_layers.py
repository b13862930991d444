"""Per-layer convolution timings of each `resnet_jax.cpu.fast_conv` path: the evidence for "auto".

    python benchmarks/conv_layers.py [--layers=cifar|imagenet] [--reps=5]

For every distinct convolution shape of the CIFAR ResNets (batch 128) or of ResNet-50
(batch 8), times the forward pass, the gradient wrt the input and the gradient wrt the
kernel, each compiled alone with its path's `compiler_options`, on each path ("xla",
"auto", "shifted"), both as a plain jitted function and inside a `lax.scan` body, which
is where the training step runs them and where XLA:CPU's own gradient convolutions are
slow. Prints one markdown row per layer, part and context: the median milliseconds of
`reps` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax.backend import keep_freed_memory_on_cpu
from resnet_jax.cpu.fast_conv import CONV_PATHS, compiler_options, conv_general_dilated_for

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
# What nn.Conv passes for NHWC inputs and HWIO kernels.
NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
PARTS = ("forward", "input_grad", "weight_grad")


def part_fn(path: str, part: str, kernel: int, stride: int):
    """f(x, w, g) computing only `part` of one convolution (XLA drops the rest)."""
    conv_fn = conv_general_dilated_for(path)
    pad = ((kernel // 2, kernel // 2),) * 2

    def conv(x, w):
        return conv_fn(x, w, (stride, stride), pad, dimension_numbers=NHWC)

    def f(x, w, g):
        if part == "forward":
            return conv(x, w)
        _, vjp = jax.vjp(conv, x, w)
        return vjp(g)[PARTS.index(part) - 1]

    return f


def in_scan_body(f):
    return lambda *args: lax.scan(lambda carry, _: (carry, f(*args)), 0, length=1)[1][0]


def median_ms(f, args, reps: int) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="cifar", choices=tuple(LAYERS))
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    keep_freed_memory_on_cpu()  # as train.py does: no page faults on fresh outputs
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; median ms of {args.reps} calls")
    print("| batch, size, in -> out, kernel/stride | part | context | " + " | ".join(CONV_PATHS) + " |")
    print("|---|---|---|" + "---|" * len(CONV_PATHS))
    for batch, size, c_in, c_out, kernel, stride in LAYERS[args.layers]:
        out = (size + 2 * (kernel // 2) - kernel) // stride + 1
        x, w, g = (
            jnp.asarray(rng.standard_normal(shape), jnp.float32)
            for shape in ((batch, size, size, c_in), (kernel, kernel, c_in, c_out), (batch, out, out, c_out))
        )
        for part in PARTS:
            for context in ("jit", "scan"):
                times = []
                for path in CONV_PATHS:
                    f = part_fn(path, part, kernel, stride)
                    fn = in_scan_body(f) if context == "scan" else f
                    times.append(median_ms(jax.jit(fn, compiler_options=compiler_options(path)), (x, w, g),
                                           args.reps))
                print(f"| {batch}, {size}x{size}, {c_in} -> {c_out}, {kernel}x{kernel}/{stride} | {part} | "
                      f"{context} | " + " | ".join(f"{t:.1f}" for t in times) + " |", flush=True)


if __name__ == "__main__":
    main()
