"""The networks of "Deep Residual Learning for Image Recognition" as Flax Linen modules.

The file reads like the paper: blocks (Fig. 2 and Fig. 5), the shortcut options A/B/C
(Sec. 3.3), the two stems (Table 1 and Sec. 4.2), one generic `ResNet` that stacks
them, and a registry that maps the paper's names to their hyper-parameters.

Layout conventions, shared with `convert.py` and the rest of the package:
- images are NHWC, of any channel count and any size the stem can take;
- parameter paths read like Table 1: `conv1`, `bn1`, then one module per block named
  `conv{stage}_{block}` (`conv2_1` is the first block of conv2_x), each holding
  `conv1/bn1 ... conv3/bn3` and, for projections, `shortcut_conv/shortcut_bn`; `fc`;
- every convolution pads like torchvision (3x3 by 1, 7x7 by 3), not with XLA's 'SAME',
  whose stride-2 windows start one pixel later and would break weight conversion.

The convolution is a module argument, as in Flax's own examples: `conv` builds each
convolution layer and takes `nn.Conv`'s arguments (default: `nn.Conv` itself). Training
passes `nn.Conv` with a faster `conv_general_dilated` on the CPU backend; the layers'
parameters are the same whichever it is, and nothing here depends on it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "BasicBlock",
    "BatchNorm",
    "BottleneckBlock",
    "ResNet",
    "RESPONSES",
    "create_model",
    "list_models",
    "model_spec",
]

# The collection each 3x3 layer's response (Fig. 7) is sown into: Flax's own, which `init`
# leaves out, so nothing is stored unless the caller passes mutable=[RESPONSES] to `apply`.
RESPONSES = "intermediates"
SHORTCUTS = ("A", "B", "C")
OUTPUTS = ("logits", "spatial_logits", "stages")

# He et al. (2015) initialisation, as torchvision's kaiming_normal_(mode='fan_out').
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# What builds a layer: a module class, or a functools.partial of one with some arguments set.
ModuleDef = Any


def _conv(conv: ModuleDef, features: int, kernel: int, strides: int, dtype: Any, name: str) -> nn.Module:
    """Every convolution of these nets: square, no bias (BN follows), He-initialised,
    padded like torchvision."""
    return conv(
        features, (kernel, kernel), (strides, strides), padding=((kernel // 2, kernel // 2),) * 2,
        use_bias=False, kernel_init=he_normal, dtype=dtype, name=name,
    )


class BatchNorm(nn.Module):
    """BatchNorm over the batch, or over each group of `group_size` consecutive examples.

    Under `jit` with the batch split over devices, statistics over the whole batch make
    XLA insert two dependent all-reduces per layer in the forward pass (the mean, then the
    squared deviations from it), on the critical path of a step across hundreds of devices.
    With `group_size` G the batch (B, ...) is viewed as (B/G, G, ...) and each group of G
    consecutive examples is normalised by its own statistics, as Goyal et al. (2017) did
    with 32 images per GPU: where G divides each device's share of the batch, a group lies
    on one device and its statistics need no communication; where G is a multiple of it, a
    group spans whole devices and only they all-reduce its statistics. The running statistics move
    toward the groups' mean and variance averaged over the groups (a reduction that
    nothing in the step waits for, which XLA merges with the gradients'). Evaluation
    (`use_running_average`) uses the running statistics, whatever G.

    The batch variance is the mean squared deviation (two passes, as PyTorch), not the
    one-pass E[x^2] - E[x]^2 of Flax's `nn.BatchNorm(use_fast_variance=True)` default:
    that cancels catastrophically in channels whose mean is large against their spread,
    and its rounding then depends on the order of summation, so runs on 1 and on 8
    devices drifted apart with it (`tests/test_models.py` holds a channel whose mean
    dwarfs its spread); the extra pass costs little (RESULTS.md). Otherwise it computes as
    `nn.BatchNorm(use_fast_variance=False)`, with the same variables (params "scale" and
    "bias", batch_stats "mean" and "var"), so checkpoints and converted weights fit either.
    """

    use_running_average: bool = False
    group_size: int = 0  # examples per statistics group; 0: the whole batch is one group
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32  # of the output; statistics are float32 at least
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = (x.shape[-1],)
        scale = self.param("scale", self.scale_init, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        if self.use_running_average:
            return self.normalize(x, running_mean.value, running_var.value, scale, bias)
        groups = statistics_groups(x, self.group_size)  # (groups, G, ..., C)
        within_group = tuple(range(1, groups.ndim - 1))
        wide = groups.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = wide.mean(within_group, keepdims=True)
        var = jnp.square(wide - mean).mean(within_group, keepdims=True)
        if not self.is_initializing():
            for running, batch in ((running_mean, mean), (running_var, var)):
                over_groups = batch.reshape(-1, *features).mean(0)
                running.value = self.momentum * running.value + (1 - self.momentum) * over_groups
        return self.normalize(groups, mean, var, scale, bias).reshape(x.shape)

    def normalize(self, x, mean, var, scale, bias) -> jnp.ndarray:
        """(x - mean) / sqrt(var + epsilon) x scale + bias, in Flax's order of operations."""
        return jnp.asarray((x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias, self.dtype)


def statistics_groups(x: jnp.ndarray, group_size: int) -> jnp.ndarray:
    """x (B, ...) viewed as (B / group_size, group_size, ...), consecutive examples
    together; group_size 0: one group of the whole batch."""
    batch = x.shape[0]
    size = group_size or batch
    if size < 0 or batch % size:
        raise ValueError(
            f"BatchNorm group_size={group_size} does not divide the batch of {batch} examples: "
            "each group of group_size consecutive examples is normalised on its own statistics; "
            f"accepted: a divisor of {batch}, or 0 for statistics over the whole batch"
        )
    return x.reshape(batch // size, size, *x.shape[1:])


def _batch_norm(train: bool, momentum: float, epsilon: float, group_size: int, dtype: Any, name: str,
                scale_init: Callable = nn.initializers.ones) -> BatchNorm:
    """Every BN layer of these nets."""
    return BatchNorm(
        use_running_average=not train, group_size=group_size, momentum=momentum, epsilon=epsilon,
        dtype=dtype, name=name, scale_init=scale_init,
    )


def shortcut_a(x: jnp.ndarray, features: int, strides: int) -> jnp.ndarray:
    """Option A: identity, subsampled by `strides` and zero-padded to `features` channels."""
    if strides > 1:
        x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x


class _Block(nn.Module):
    """What the basic and bottleneck blocks share: the shortcut and the final addition."""

    features: int  # width of the 3x3 layers; outputs have features * expansion channels
    strides: int = 1
    shortcut: str | None = "B"  # None: a plain block, no shortcut at all
    stride_in_1x1: bool = False
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_group_size: int = 0  # examples per BN statistics group in training (see BatchNorm)
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv  # builds each convolution layer (see the module's docstring)

    expansion = 1

    def conv_layer(self, features: int, kernel: int, strides: int, name: str) -> nn.Module:
        return _conv(self.conv, features, kernel, strides, self.dtype, name)

    def norm(self, train: bool, name: str, zero_scale: bool = False) -> BatchNorm:
        return _batch_norm(
            train, self.bn_momentum, self.bn_epsilon, self.bn_group_size, self.dtype, name,
            scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        )

    def add_shortcut(self, x: jnp.ndarray, residual: jnp.ndarray, train: bool) -> jnp.ndarray:
        out_features = self.features * self.expansion
        if self.shortcut is None:
            return residual
        shape_changes = self.strides != 1 or x.shape[-1] != out_features
        if self.shortcut == "C" or (self.shortcut == "B" and shape_changes):
            x = self.conv_layer(out_features, 1, self.strides, "shortcut_conv")(x)
            x = self.norm(train, "shortcut_bn")(x)
        elif shape_changes:
            x = shortcut_a(x, out_features, self.strides)
        return residual + x

    def respond(self, y: jnp.ndarray) -> jnp.ndarray:
        """Record a 3x3 layer's response after BN, before ReLU or addition (Fig. 7)."""
        self.sow(RESPONSES, "response", y)
        return y


class BasicBlock(_Block):
    """Two 3x3 layers (Fig. 2, left of Fig. 5): ResNet-18/34 and every CIFAR net."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = self.conv_layer(self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(self.respond(self.norm(train, "bn1")(y)))
        y = self.conv_layer(self.features, 3, 1, "conv2")(y)
        y = self.respond(self.norm(train, "bn2", self.zero_init_residual)(y))
        return nn.relu(self.add_shortcut(x, y, train))


class BottleneckBlock(_Block):
    """1x1 reduce, 3x3, 1x1 expand by 4 (right of Fig. 5): ResNet-50/101/152.

    The stride sits on the 3x3 layer (v1.5, torchvision's) unless `stride_in_1x1`,
    which puts it on the first 1x1 as in the paper and its released Caffe models (v1).
    """

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        stride_1x1, stride_3x3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        y = self.conv_layer(self.features, 1, stride_1x1, "conv1")(x)
        y = nn.relu(self.norm(train, "bn1")(y))
        y = self.conv_layer(self.features, 3, stride_3x3, "conv2")(y)
        y = nn.relu(self.respond(self.norm(train, "bn2")(y)))
        y = self.conv_layer(self.features * self.expansion, 1, 1, "conv3")(y)
        y = self.norm(train, "bn3", self.zero_init_residual)(y)
        return nn.relu(self.add_shortcut(x, y, train))


BLOCKS: dict[str, type[_Block]] = {"basic": BasicBlock, "bottleneck": BottleneckBlock}
STEMS = ("cifar", "imagenet")


class ResNet(nn.Module):
    """A residual or plain network: stem, stages of blocks, global average pool, FC.

    `__call__(x, train=False, output="logits")` returns
    - "logits": (N, num_classes) class scores;
    - "spatial_logits": (N, H', W', num_classes), the FC applied at every location of the
      last stage (the fully-convolutional form used for multi-scale testing; its mean
      over locations equals "logits");
    - "stages": {"conv2_x": ..., "conv3_x": ...}, each stage's output (a backbone).
    """

    stage_sizes: tuple[int, ...]
    block: str = "basic"  # "basic" or "bottleneck"
    stem: str = "imagenet"  # "imagenet" (7x7/2 conv, 64, 3x3/2 max pool) or "cifar" (3x3, 16)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    residual: bool = True
    shortcut: str = "B"
    stride_in_1x1: bool = False
    num_classes: int = 1000
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_group_size: int = 0  # examples per BN statistics group in training (see BatchNorm)
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv  # builds each convolution layer (see the module's docstring)

    def __post_init__(self):
        _check_choice("block", self.block, tuple(BLOCKS))
        _check_conv(self.conv)
        _check_choice("stem", self.stem, STEMS)
        _check_choice("shortcut", self.shortcut, SHORTCUTS)
        if len(self.widths) != len(self.stage_sizes):
            raise ValueError(
                f"widths {self.widths} and stage_sizes {self.stage_sizes} must have the same length"
            )
        if self.bn_group_size < 0:
            raise ValueError(
                f"bn_group_size={self.bn_group_size}: expected 0 (BN statistics over the whole batch) "
                "or the number of consecutive examples in each statistics group"
            )
        if self.zero_init_residual and not self.residual:
            raise ValueError(
                "zero_init_residual=True needs a residual net: in a plain net a zero BN "
                "scale would cut the signal; accepted for plain nets: False"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, output: str = "logits"):
        _check_choice("output", output, OUTPUTS)
        block_cls = BLOCKS[self.block]
        x = jnp.asarray(x, self.dtype)
        features, kernel, strides = (16, 3, 1) if self.stem == "cifar" else (64, 7, 2)
        x = _conv(self.conv, features, kernel, strides, self.dtype, "conv1")(x)
        x = _batch_norm(train, self.bn_momentum, self.bn_epsilon, self.bn_group_size, self.dtype, "bn1")(x)
        if self.stem == "cifar":
            self.sow(RESPONSES, "stem_response", x)  # the CIFAR stem is a 3x3 layer too
        x = nn.relu(x)
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        stages = {}
        for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for j in range(num_blocks):
                x = block_cls(
                    features=width,
                    strides=2 if i > 0 and j == 0 else 1,
                    shortcut=self.shortcut if self.residual else None,
                    stride_in_1x1=self.stride_in_1x1,
                    zero_init_residual=self.zero_init_residual,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    bn_group_size=self.bn_group_size,
                    dtype=self.dtype,
                    conv=self.conv,
                    name=f"conv{i + 2}_{j + 1}",
                )(x, train)
            stages[f"conv{i + 2}_x"] = x
        if output == "stages":
            return stages

        fc = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")
        if output == "spatial_logits":
            return fc(x)
        return fc(jnp.mean(x, axis=(1, 2)))


def _check_choice(field: str, value: Any, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{field}={value!r} is not supported; accepted: {', '.join(map(repr, accepted))}")


def _check_conv(conv: Any) -> None:
    if not callable(conv):
        raise ValueError(f"conv={conv!r} is not a module: expected nn.Conv or a callable that builds one")


# ---------------------------------------------------------------------------------------
# The registry: the paper's names -> ResNet hyper-parameters.

IMAGENET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# CIFAR nets are 6n+2 layers deep; these are the named ones (the paper's, plus the two
# smallest for quick experiments). Any other 6n+2 depth is built on request.
CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110, 1202)
CIFAR_PLAIN_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
_NAME = re.compile(r"(resnet|plain)(\d+)")


def list_models() -> list[str]:
    """Every named model: CIFAR family (`resnet20`, `plain56`, ...) then ImageNet family."""
    cifar = [f"resnet{d}" for d in CIFAR_DEPTHS] + [f"plain{d}" for d in CIFAR_PLAIN_DEPTHS]
    imagenet = [f"{kind}{d}" for kind in ("resnet", "plain") for d in IMAGENET_STAGES]
    return cifar + imagenet


def model_spec(name: str) -> dict[str, Any]:
    """The `ResNet` fields that a model name stands for (family, stages, shortcut, ...).

    ImageNet depths (18, 34, 50, 101, 152) win where a depth could mean either family;
    any other depth must be 6n+2 and gives the CIFAR family with n blocks per stage.
    """
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"unknown model {name!r}; accepted: {', '.join(list_models())}, "
            "or resnetD / plainD for any CIFAR depth D = 6n+2"
        )
    kind, depth = match.group(1), int(match.group(2))
    residual = kind == "resnet"
    if depth in IMAGENET_STAGES:
        block, stages = IMAGENET_STAGES[depth]
        return dict(
            family="imagenet", depth=depth, block=block, stage_sizes=stages, stem="imagenet",
            widths=(64, 128, 256, 512), residual=residual, shortcut="B", num_classes=1000,
        )
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"model {name!r}: depth {depth} is neither an ImageNet depth "
            f"({', '.join(map(str, IMAGENET_STAGES))}) nor a CIFAR depth 6n+2 with n >= 1 "
            "(8, 14, 20, 26, 32, ...)"
        )
    n = (depth - 2) // 6
    return dict(
        family="cifar", depth=depth, block="basic", stage_sizes=(n, n, n), stem="cifar",
        widths=(16, 32, 64), residual=residual, shortcut="A", num_classes=10,
    )


_OVERRIDABLE = {f.name for f in dataclasses.fields(ResNet)} - {"parent", "name"}


def create_model(name: str, **overrides: Any) -> ResNet:
    """Build a named model, e.g. `create_model("resnet50", num_classes=1000, dtype=jnp.bfloat16)`.

    Overrides are any `ResNet` field: `num_classes`, `dtype`, `shortcut` ("A", "B", "C"),
    `stride_in_1x1` (v1 bottlenecks), `zero_init_residual`, `bn_momentum`, `bn_epsilon`,
    `bn_group_size` (examples per BN statistics group in training; 0: the whole batch),
    `conv` (what builds each convolution layer: `nn.Conv` by default).
    Plain nets have no shortcut, so a `shortcut` override is refused for them.
    """
    spec = model_spec(name)
    unknown = sorted(set(overrides) - _OVERRIDABLE)
    if unknown:
        raise ValueError(
            f"create_model({name!r}): unknown option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(_OVERRIDABLE))}"
        )
    if not spec["residual"] and "shortcut" in overrides:
        raise ValueError(
            f"create_model({name!r}): a plain net has no shortcuts, so shortcut="
            f"{overrides['shortcut']!r} cannot apply; use a resnet name for shortcut options"
        )
    fields = {k: v for k, v in spec.items() if k not in ("family", "depth")}
    fields.update(overrides)
    return ResNet(**fields)

