"""A drop-in `lax.conv_general_dilated` whose gradients XLA:CPU runs fast.

Flax's `nn.Conv(..., conv_general_dilated=fn)` calls `fn` in place of the lax function,
so a model keeps its parameter names, shapes and initialisation whichever path it uses.

Why (measured on the project's 2-core CPU, jax 0.10.2; `benchmarks/conv_layers.py`):
XLA:CPU runs a convolution fast only in its canonical form (NHWC input, HWIO kernel).
Outside loops its layout passes rewrite autodiff's gradient convolutions into that form,
but inside a loop body, such as the training step's `lax.scan`, they are left as they
are and fall to a generic loop nest: the weight gradient of a 3x3 layer becomes 50-100x
slower, the input gradient 3-40x, and the ResNet-20 training step ~30x. The backward pass
here writes both gradients with the transposes made explicit, so that each convolution
is canonical wherever it is traced:
- gradient wrt the input: the usual transposed convolution (flipped kernel with its
  in/out axes swapped), for a strided kernel larger than 1x1 that of the equivalent
  stride-1 convolution of the input's space-to-depth rearrangement, so that no dilated
  output gradient, mostly zeros, is convolved;
- gradient wrt the kernel: either convolutions of the input with the output gradient,
  batch and channel axes swapped, over chunks of the batch in a loop
  (`_weight_grad_conv`), or a sum over the kernel offsets of `einsum('bhwc,bhwo->co',
  shifted input, output gradient)` (`_weight_grad_shifted`). For a 1x1 kernel the
  latter is one matrix product, 2-6x faster than XLA's convolution; for larger kernels
  it is 1-7x slower.
The forward pass is XLA's own convolution, already canonical.

On a single CPU device, "auto" goes further: float32 convolutions whose output channels
are a multiple of 16 and whose kernel is under 1 MiB run on `native_conv`'s direct
kernels, called through XLA's FFI, for the forward pass, the weight gradient and the
stride-1 input gradient (that of a strided kernel too, after space-to-depth, when its
input channels are a multiple of 16). On ResNet-20's layers their weight gradients are
1.0-2.8x as fast as XLA's Eigen kernels, their forward passes and input gradients
0.9-1.3x. The rest keeps the paths above; so does everything when the kernels cannot be
built (no C++ compiler). The kernels have no derivative of their own: second-order
derivatives need "xla".

Paths (the config key `model.conv`; training gives the model `nn.Conv` with the path's
function on the CPU backend, see `resnet_jax/backend.py`):
- "xla": `lax.conv_general_dilated` with JAX's own gradients;
- "shifted": the custom gradients, every weight gradient as shifted einsums, no native
  kernels;
- "auto" (default): on the CPU backend, the native kernels where they apply, otherwise
  the custom gradients with each layer's faster weight gradient (shifted einsums for 1x1
  kernels, the chunked convolutions otherwise); on other backends, "xla".
`compiler_options(path)` are the XLA options to compile a computation using a path with
(`train.py` passes them to `jax.jit`): on the CPU, XLA's own convolution kernels rather
than YNNPACK's, which are slower for these layers.
Convolutions this module does not cover (grouped, dilated, other layouts, a requested
output dtype) use "xla" on every path. Results equal "xla" to float rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.cpu import native_conv

CONV_PATHS = ("auto", "xla", "shifted")
# Examples per weight-gradient convolution (see _weight_grad_conv).
WEIGHT_GRAD_CHUNK = 16
# What Flax's nn.Conv passes for NHWC inputs and HWIO kernels.
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_CANONICAL = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated_for(path: str) -> Callable:
    """The `conv_general_dilated` to give `nn.Conv` for `path` (one of `CONV_PATHS`)."""
    if path not in CONV_PATHS:
        raise ValueError(f"conv={path!r} is not supported; accepted: {', '.join(map(repr, CONV_PATHS))}")
    if path == "xla" or (path == "auto" and jax.default_backend() != "cpu"):
        return lax.conv_general_dilated
    return _SHIFTED if path == "shifted" else _AUTO


def compiler_options(path: str) -> dict[str, str]:
    """XLA options for compiling a computation whose convolutions take `path`.

    On the CPU backend, "auto" and "shifted" keep YNNPACK, which XLA:CPU uses by default
    for some convolutions, matrix products and reductions, to the reductions only: there
    it is 5x faster than XLA's own code (the BN statistics), but its convolutions are
    slower than XLA's Eigen ones (ResNet-20's 3x3 layer of 32 channels at 16x16, forward:
    6.5 ms against 3.7 ms; its training step: 1.2x faster without them). Empty where the
    option does not apply ("xla", other backends, an XLA without the option).
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
    *,
    weight_grad: str = "auto",
) -> jax.Array:
    """`lax.conv_general_dilated` (same arguments) with the backward pass described above.

    `weight_grad`: "auto" (the native kernels where `native_conv.supported`, else shifted
    einsums for 1x1 kernels and chunked canonical convolutions otherwise) or "shifted"
    (shifted einsums for every kernel, no native kernels).
    """
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
    native = weight_grad == "auto" and native_conv.supported(lhs, rhs.shape, pads)
    shifted = weight_grad == "shifted" or rhs.shape[:2] == (1, 1)
    return _conv(lhs, rhs, tuple(window_strides), pads, precision, native, shifted)


_AUTO = functools.partial(conv_general_dilated, weight_grad="auto")
_SHIFTED = functools.partial(conv_general_dilated, weight_grad="shifted")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(x, kernel, strides, pads, precision, native, shifted):
    if native:
        return native_conv.forward(x, kernel, strides, pads)
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=_CANONICAL, precision=precision
    )


def _conv_fwd(x, kernel, strides, pads, precision, native, shifted):
    return _conv(x, kernel, strides, pads, precision, native, shifted), (x, kernel)


def _conv_bwd(strides, pads, precision, native, shifted, residuals, grad_out):
    x, kernel = residuals
    if native:
        weight_grad = native_conv.weight_grad(x, grad_out, kernel.shape, strides, pads)
    else:
        weight_grad = (_weight_grad_shifted if shifted else _weight_grad_conv)(
            x, grad_out, kernel.shape, strides, pads, precision
        )
    return _input_grad(grad_out, kernel, x.shape, strides, pads, precision, native), weight_grad


_conv.defvjp(_conv_fwd, _conv_bwd)


def _input_grad(grad_out, kernel, x_shape, strides, pads, precision, native):
    """The transposed convolution: the output gradient, dilated by the stride, convolved
    with the kernel flipped in space and with its in/out channel axes swapped. A strided
    kernel larger than 1x1 goes through `_input_grad_space_to_depth` instead. With
    `native`, a stride-1 one runs on `native_conv` where it supports it."""
    if any(s > 1 for s in strides) and kernel.shape[:2] != (1, 1):
        return _input_grad_space_to_depth(grad_out, kernel, x_shape, strides, pads, precision, native)
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    padding = [
        # In front, k - 1 - lo: input row 0 meets the taps of the first window that read it.
        # Behind, as many as the input rows after the first row of the last window.
        (k - 1 - lo, size - 1 + lo - s * (out - 1))
        for k, (lo, _), size, s, out in zip(
            kernel.shape[:2], pads, x_shape[1:3], strides, grad_out.shape[1:3], strict=True
        )
    ]
    if native and strides == (1, 1) and native_conv.supported(grad_out, flipped.shape, padding):
        return native_conv.forward(grad_out, flipped, strides, padding)
    return lax.conv_general_dilated(
        grad_out, flipped, (1, 1), padding, lhs_dilation=strides, dimension_numbers=_CANONICAL,
        precision=precision,
    )


def _input_grad_space_to_depth(grad_out, kernel, x_shape, strides, pads, precision, native):
    """The input gradient of a strided convolution without dilating the output gradient.

    A (kh, kw) kernel at stride (sh, sw) reads the padded input as a stride-1 convolution
    reads its space-to-depth rearrangement (each sh x sw block of pixels one pixel with
    sh * sw * C channels) with a ceil(kh / sh) x ceil(kw / sw) kernel, zero where the
    strided kernel has no tap. The gradient of that stride-1 convolution is a plain
    transposed convolution, rearranged back with depth-to-space and cropped to the input.
    The dilated form spends most of its time on the zeros the dilation inserts: 2.5x
    slower for ResNet-20's 16 -> 32 channel downsampling layer (`benchmarks/conv_layers.py`).
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
        (1, 1), ((0, 0), (0, 0)), precision, native,
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
    stored and transposes a chunk that stays in cache (ResNet-20 step: 1.4x faster than
    the whole batch at once; chunks of 8 to 32 alike, of 4 slower; the same chunks
    unrolled instead of looped ran as fast and compiled 3x slower). With XLA's own (Eigen)
    convolutions, chunks of 16 beat 8 by 2-15% on ResNet-20's layers. The padding stays
    inside the convolution: a padded, transposed copy of x was 3-4x slower.
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
