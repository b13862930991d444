"""A drop-in `lax.conv_general_dilated` whose every part runs the fastest way measured on this CPU.

Flax's `nn.Conv(..., conv_general_dilated=fn)` calls `fn` in place of the lax function,
so a model keeps its parameter names, shapes and initialisation whichever path it uses.

Paths (the config key `model.conv`; training gives the model `nn.Conv` with the path's
function, `conv_general_dilated_for(path)`, on the CPU backend, see `resnet_jax/backend.py`):
- "xla": `lax.conv_general_dilated` with JAX's own gradients;
- "auto" (default): on the CPU backend, a custom-VJP convolution whose forward pass,
  input gradient and weight gradient each run the formulation that `conv_choice`
  measured fastest for the layer's shape on this CPU (once, then cached); on other
  backends, "xla". It is "xla" or faster on every layer by construction, as XLA's own
  convolution is one of the candidates of each part.

The formulations (`FORMULATIONS`; `benchmarks/conv_layers.py` times each one per layer,
`benchmarks/RESULTS.md` records where each wins):
- forward: "xla" (`lax.conv_general_dilated`) or "native" (`native_conv`'s direct kernels,
  through XLA's FFI, where `native_conv.supported`: float32, output channels a multiple
  of 16, a kernel under 1 MiB, one CPU device, the kernels built; a candidate only there);
- input gradient: "xla", the transposed convolution (the output gradient, dilated by the
  stride, convolved with the flipped kernel, its in/out axes swapped), what XLA's own
  gradient computes, in canonical form; for a strided kernel larger than 1x1
  "space_to_depth", the gradient of the equivalent stride-1 convolution of the input's
  space-to-depth rearrangement, so that no dilated output gradient, mostly zeros, is
  convolved; or "native", the stride-1 convolution (after space-to-depth for a strided
  kernel) on the native kernels where they apply;
- weight gradient: "conv", convolutions of the input with the output gradient, batch
  and channel axes swapped, over chunks of the batch in a loop (`_weight_grad_conv`);
  "shifted", a sum over the kernel offsets of `einsum('bhwc,bhwo->co', shifted input,
  output gradient)`; or "native".
Why these and not autodiff's: XLA:CPU runs a convolution fast only in its canonical form
(NHWC input, HWIO kernel); outside loops its layout passes rewrite autodiff's gradient
convolutions into that form, but inside a loop body, such as a multi-step dispatch's
`lax.scan`, they fall to a generic loop nest tens of times slower. Every formulation here
is canonical wherever it is traced. The native kernels have no derivative of their own:
second-order derivatives need "xla". Convolutions this module does not cover (grouped,
dilated, other layouts, a requested output dtype) use "xla" on every path. Results equal
"xla" to float rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.cpu import conv_choice, native_conv

CONV_PATHS = ("auto", "xla")
PARTS = ("forward", "input_grad", "weight_grad")
# Each part's formulations; the first is XLA's own convolution, what "auto" uses unmeasured.
FORMULATIONS = {
    "forward": ("xla", "native"),
    "input_grad": ("xla", "space_to_depth", "native"),
    "weight_grad": ("conv", "shifted", "native"),
}
# Multiply-adds below which a convolution is not measured: its time is mostly dispatch,
# and measuring it would cost more than choosing could save (ResNet-20's layers at batch
# 128 have 75M each).
MIN_MEASURED_MACS = 1 << 24
# Examples per weight-gradient convolution (see _weight_grad_conv).
WEIGHT_GRAD_CHUNK = 16
# What Flax's nn.Conv passes for NHWC inputs and HWIO kernels.
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_CANONICAL = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated_for(path: str) -> Callable:
    """The `conv_general_dilated` to give `nn.Conv` for `path` (one of `CONV_PATHS`)."""
    if path not in CONV_PATHS:
        raise ValueError(f"conv={path!r} is not supported; accepted: {', '.join(map(repr, CONV_PATHS))}")
    if path == "xla" or jax.default_backend() != "cpu":
        return lax.conv_general_dilated
    return conv_general_dilated


def compiler_options(path: str) -> dict[str, str]:
    """XLA options for compiling a computation whose convolutions take `path`.

    On the CPU backend, "auto" keeps YNNPACK, which XLA:CPU uses by default for some
    convolutions, matrix products and reductions, to the reductions only: there it is
    faster than XLA's own code (the BN statistics), but its convolutions were slower than
    XLA's Eigen ones on every ResNet layer measured, and the training step faster without
    them (`benchmarks/RESULTS.md`). Empty where the option does not apply ("xla", other
    backends, an XLA without the option).
    """
    if conv_general_dilated_for(path) is lax.conv_general_dilated or not _has_ynn_option():
        return {}
    return dict(_YNN_REDUCTIONS_ONLY)


_YNN_REDUCTIONS_ONLY = (("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_REDUCE"),)


@functools.cache
def _has_ynn_option() -> bool:
    """Whether this XLA knows the (experimental) option: compiling with an unknown one fails."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(_YNN_REDUCTIONS_ONLY)).lower(0.0).compile()
    except jax.errors.JaxRuntimeError:  # "No such compile option"
        return False
    return True


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: lax.ConvDimensionNumbers | None = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """`lax.conv_general_dilated` (same arguments), each part computed by its chosen formulation."""
    covered = (
        lhs.ndim == 4 and dimension_numbers == _NHWC and feature_group_count == 1
        and batch_group_count == 1 and preferred_element_type is None
        and all(d == 1 for d in (*(lhs_dilation or (1, 1)), *(rhs_dilation or (1, 1))))
    )
    if not covered:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
        )
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision)


def formulation(part: str, name: str, x_shape: Sequence[int], kernel_shape: Sequence[int],
                strides: Sequence[int], pads: Sequence[tuple[int, int]], precision=None) -> Callable:
    """`part` of the convolution of an NHWC input of `x_shape` with an HWIO kernel of
    `kernel_shape`, computed by formulation `name` (one of `FORMULATIONS[part]`): a
    function of (input, kernel) for "forward", (output gradient, kernel) for
    "input_grad", (input, output gradient) for "weight_grad"."""
    if name not in FORMULATIONS[part]:
        raise ValueError(f"{part} has no formulation {name!r}; accepted: {', '.join(FORMULATIONS[part])}")
    native = name == "native"
    if part == "forward":
        return lambda x, kernel: _forward(x, kernel, strides, pads, precision, native)
    if part == "input_grad":
        return lambda grad_out, kernel: _input_grad(grad_out, kernel, x_shape, strides, pads, precision, name)
    weight_grad = {"conv": _weight_grad_conv, "shifted": _weight_grad_shifted,
                   "native": _weight_grad_native}[name]
    return lambda x, grad_out: weight_grad(x, grad_out, kernel_shape, strides, pads, precision)


def argument_shapes(part: str, x: jax.ShapeDtypeStruct, kernel: jax.ShapeDtypeStruct,
                    strides: Sequence[int], pads: Sequence[tuple[int, int]]) -> tuple:
    """The shapes and dtypes of the two arguments of `formulation(part, ...)`."""
    out = jax.eval_shape(lambda x, kernel: _forward(x, kernel, strides, pads, None, False), x, kernel)
    return {"forward": (x, kernel), "input_grad": (out, kernel), "weight_grad": (x, out)}[part]


def candidates(part: str, x: jax.ShapeDtypeStruct, kernel: jax.ShapeDtypeStruct, strides: Sequence[int],
               pads: Sequence[tuple[int, int]], precision=None) -> dict[str, Callable]:
    """The formulations of `part` of this convolution that compute it differently from
    those before them in `FORMULATIONS[part]` (the native kernels where they apply,
    space-to-depth for strided kernels larger than 1x1), by name."""
    specs = argument_shapes(part, x, kernel, strides, pads)
    found, computations = {}, set()
    for name in FORMULATIONS[part]:
        fn = formulation(part, name, x.shape, kernel.shape, strides, pads, precision)
        computation = str(jax.make_jaxpr(fn)(*specs))
        if computation not in computations:
            found[name] = fn
            computations.add(computation)
    return found


def choice(part: str, x: jax.ShapeDtypeStruct, kernel: jax.ShapeDtypeStruct, strides: Sequence[int],
           pads: Sequence[tuple[int, int]], precision=None) -> str:
    """The formulation "auto" computes `part` of this convolution with: for one of under
    `MIN_MEASURED_MACS` multiply-adds, the first of `FORMULATIONS[part]`, XLA's own
    convolution, unmeasured; else the fastest of its `candidates`, as `conv_choice`
    measured them on this CPU."""
    x, kernel = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, kernel))
    out = argument_shapes("input_grad", x, kernel, strides, pads)[0]
    if math.prod(kernel.shape[:3]) * math.prod(out.shape) < MIN_MEASURED_MACS:
        return FORMULATIONS[part][0]
    found = candidates(part, x, kernel, strides, pads, precision)
    key = (f"{part} {x.dtype} input {x.shape} kernel {kernel.shape} strides {tuple(strides)} "
           f"pads {tuple(pads)}: {', '.join(found)}")
    specs = argument_shapes(part, x, kernel, strides, pads)
    return conv_choice.choose(key, {name: (fn, specs) for name, fn in found.items()},
                              compiler_options("auto"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, pads, precision):
    name = choice("forward", x, kernel, strides, pads, precision)
    return formulation("forward", name, x.shape, kernel.shape, strides, pads, precision)(x, kernel)


def _conv_fwd(x, kernel, strides, pads, precision):
    return _conv(x, kernel, strides, pads, precision), (x, kernel)


def _conv_bwd(strides, pads, precision, residuals, grad_out):
    x, kernel = residuals
    grads = []
    for part, args in (("input_grad", (grad_out, kernel)), ("weight_grad", (x, grad_out))):
        name = choice(part, x, kernel, strides, pads, precision)
        grads.append(formulation(part, name, x.shape, kernel.shape, strides, pads, precision)(*args))
    return tuple(grads)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _forward(x, kernel, strides, pads, precision, native):
    """With `native`, on `native_conv` where it supports the convolution."""
    if native and native_conv.supported(x, kernel.shape, pads):
        return native_conv.forward(x, kernel, strides, pads)
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=_CANONICAL, precision=precision
    )


def _input_grad(grad_out, kernel, x_shape, strides, pads, precision, name):
    """The transposed convolution: the output gradient, dilated by the stride, convolved
    with the kernel flipped in space and with its in/out channel axes swapped. For a
    strided kernel larger than 1x1, formulations "space_to_depth" and "native" go through
    `_input_grad_space_to_depth` instead; "native" runs a stride-1 one on `native_conv`
    where it supports it."""
    if name != "xla" and any(s > 1 for s in strides) and kernel.shape[:2] != (1, 1):
        return _input_grad_space_to_depth(grad_out, kernel, x_shape, strides, pads, precision, name)
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    padding = [
        # In front, k - 1 - lo: input row 0 meets the taps of the first window that read it.
        # Behind, as many as the input rows after the first row of the last window.
        (k - 1 - lo, size - 1 + lo - s * (out - 1))
        for k, (lo, _), size, s, out in zip(
            kernel.shape[:2], pads, x_shape[1:3], strides, grad_out.shape[1:3], strict=True
        )
    ]
    if name == "native" and strides == (1, 1) and native_conv.supported(grad_out, flipped.shape, padding):
        return native_conv.forward(grad_out, flipped, strides, padding)
    return lax.conv_general_dilated(
        grad_out, flipped, (1, 1), padding, lhs_dilation=strides, dimension_numbers=_CANONICAL,
        precision=precision,
    )


def _input_grad_space_to_depth(grad_out, kernel, x_shape, strides, pads, precision, name):
    """The input gradient of a strided convolution without dilating the output gradient.

    A (kh, kw) kernel at stride (sh, sw) reads the padded input as a stride-1 convolution
    reads its space-to-depth rearrangement (each sh x sw block of pixels one pixel with
    sh * sw * C channels) with a ceil(kh / sh) x ceil(kw / sw) kernel, zero where the
    strided kernel has no tap. The gradient of that stride-1 convolution is a plain
    transposed convolution, rearranged back with depth-to-space and cropped to the input.
    The dilated form spends most of its time on the zeros the dilation inserts
    (`benchmarks/RESULTS.md`).
    """
    (kh, kw), (sh, sw) = kernel.shape[:2], strides
    c_in, c_out = kernel.shape[2:]
    blocks_h, blocks_w = -(-kh // sh), -(-kw // sw)  # the kernel's size in blocks
    taps = jnp.pad(kernel, ((0, blocks_h * sh - kh), (0, blocks_w * sw - kw), (0, 0), (0, 0)))
    blocked = (  # (blocks_h, blocks_w, sh * sw * c_in, c_out), input channels ordered (row, column, c)
        taps.reshape(blocks_h, sh, blocks_w, sw, c_in, c_out)
        .transpose(0, 2, 1, 3, 4, 5)
        .reshape(blocks_h, blocks_w, sh * sw * c_in, c_out)
    )
    out_h, out_w = grad_out.shape[1:3]
    # The blocked input rows the output reads: out_h + blocks_h - 1 (likewise columns).
    grad_blocks = _input_grad(
        grad_out, blocked, (x_shape[0], out_h + blocks_h - 1, out_w + blocks_w - 1, sh * sw * c_in),
        (1, 1), ((0, 0), (0, 0)), precision, name,
    )
    batch, rows, cols = grad_blocks.shape[:3]
    grad_padded = (
        grad_blocks.reshape(batch, rows, cols, sh, sw, c_in)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(batch, rows * sh, cols * sw, c_in)
    )
    # Crop the padding off; input rows or columns past the last window get no gradient.
    (lo_h, _), (lo_w, _) = pads
    height, width = x_shape[1:3]
    grad = grad_padded[:, lo_h : lo_h + height, lo_w : lo_w + width]
    return jnp.pad(grad, ((0, 0), (0, height - grad.shape[1]), (0, width - grad.shape[2]), (0, 0)))


def _weight_grad_conv(x, grad_out, kernel_shape, strides, pads, precision):
    """dW[i, j, c, o] = sum over b, h, w of x_padded[b, s*h + i, s*w + j, c] * g[b, h, w, o], as
    canonical convolutions: channels of x as their batch, examples as the contracted
    feature axis, the output gradient (dilated by the stride) as the kernel.

    One convolution per chunk of `WEIGHT_GRAD_CHUNK` examples, summed in a loop. Over the
    whole batch at once, XLA fuses the recomputation of x (BN, ReLU, the residual
    additions) into the transpose that moves the examples innermost, and reading a batch
    in that order misses the cache on nearly every element; a loop body gets x as it is
    stored and transposes a chunk that stays in cache. The padding stays inside the
    convolution: a padded, transposed copy of x was slower (`benchmarks/RESULTS.md`
    records the chunk sizes and variants measured).
    """
    padding = [
        (lo, k + s * (out - 1) - size - lo)  # the trailing end the last window reaches
        for k, (lo, _), size, s, out in zip(
            kernel_shape[:2], pads, x.shape[1:3], strides, grad_out.shape[1:3], strict=True
        )
    ]

    def chunk_grad(x_chunk, grad_chunk):  # (C, kh, kw, O)
        return lax.conv_general_dilated(
            jnp.transpose(x_chunk, (3, 1, 2, 0)), jnp.transpose(grad_chunk, (1, 2, 0, 3)),
            (1, 1), padding, rhs_dilation=strides, dimension_numbers=_CANONICAL, precision=precision,
            preferred_element_type=jnp.float32,  # summed in float32, rounded once, as XLA's own
        )

    def add_chunk(index, total):
        start = index * chunk
        return total + chunk_grad(
            lax.dynamic_slice_in_dim(x, start, chunk), lax.dynamic_slice_in_dim(grad_out, start, chunk)
        )

    batch = x.shape[0]
    chunk = min(WEIGHT_GRAD_CHUNK, batch)
    full = batch // chunk * chunk
    total = jnp.zeros((x.shape[3], *kernel_shape[:2], grad_out.shape[3]), jnp.float32)
    total = lax.fori_loop(0, batch // chunk, add_chunk, total)
    if full < batch:
        total += chunk_grad(x[full:], grad_out[full:])
    return jnp.transpose(total, (1, 2, 0, 3)).astype(x.dtype)


def _weight_grad_native(x, grad_out, kernel_shape, strides, pads, precision):
    """On `native_conv` where it supports the convolution, else `_weight_grad_conv`."""
    if native_conv.supported(x, kernel_shape, pads):
        return native_conv.weight_grad(x, grad_out, kernel_shape, strides, pads)
    return _weight_grad_conv(x, grad_out, kernel_shape, strides, pads, precision)


def _weight_grad_shifted(x, grad_out, kernel_shape, strides, pads, precision):
    """The same sum, one `einsum('bhwc,bhwo->co')` per kernel offset over the strided window
    of the padded input that the offset saw."""
    kh, kw = kernel_shape[:2]
    (sh, sw), (out_h, out_w) = strides, grad_out.shape[1:3]
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
    rows = []
    for i in range(kh):
        row = []
        for j in range(kw):
            window = lax.slice(
                x, (0, i, j, 0), (x.shape[0], i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, x.shape[3]),
                (1, sh, sw, 1),
            )
            row.append(jnp.einsum("bhwc,bhwo->co", window, grad_out, precision=precision))
        rows.append(jnp.stack(row))
    return jnp.stack(rows)
