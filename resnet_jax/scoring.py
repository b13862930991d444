"""How a batch of evaluation views becomes class scores: the paper's testing protocols.

- "center": one crop per image; its logits.
- "ten_crop": ten crops per image (Sec. 3.4's comparisons); the softmax averaged over them.
- "multi_scale": the fully-convolutional net (Sec. 3.4's best results) on the whole image
  and its flip at each scale, padded to its aspect bucket's canvas
  (`augment.multi_scale_views`); only the image's own locations are scored. Where the
  softmax and the averages happen is `average` (`AVERAGES`):
  - "scores" (the default): the class-score map averaged over the image's locations,
    its softmax, averaged over the flip and the scales. This is what the paper's
    fully-convolutional testing follows: it cites VGG (Simonyan & Zisserman 2015,
    Sec. 3.2), whose score map is "spatially averaged (sum-pooled)" and whose softmax
    posteriors are averaged over flips and scales; the spatial mean of the score map is
    the network's own global-pool logits of the whole image.
  - "probabilities": the softmax at every location, averaged over the locations, the
    flip and the scales.
Multi-view modes return the log of the averaged probabilities, so the same loss and
top-k errors (`metrics.classification_metrics`) apply to every mode.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.data.augment import inside
from resnet_jax.models import BatchNorm, ResNet

MODES = ("center", "ten_crop", "multi_scale")
AVERAGES = ("scores", "probabilities")


def _log(probabilities: jnp.ndarray) -> jnp.ndarray:
    # An averaged probability can underflow to 0; its log stays finite (as a loss).
    return jnp.log(jnp.maximum(probabilities, jnp.finfo(jnp.float32).tiny))


def _valid_at(valid: jnp.ndarray, canvas: tuple[int, int], grid: tuple[int, int]) -> jnp.ndarray:
    """The image's size on a feature map of size `grid` of a canvas of size `canvas`: every
    stride-2 layer of these nets (padding k // 2, or a 1x1 / subsampling) maps n rows to
    ceil(n / 2), so after k of them the image covers ceil(valid / 2^k)."""
    for k in range(16):
        if all(math.ceil(c / 2**k) == g for c, g in zip(canvas, grid, strict=True)):
            return -(-valid // 2**k)
    raise ValueError(f"a {grid} feature map is no stride-2 reduction of a {canvas} canvas")


def spatial_scores(model: ResNet, variables: dict, images: jnp.ndarray, valid: jnp.ndarray):
    """(score map (N, H', W', classes), inside (N, H', W') bool) of images (N, H, W, C), each
    of size `valid[n]` in the top-left corner of its canvas, zero outside it.

    At the image's own locations the map equals the one of the image alone: the input of
    every convolution and the output of every BN is zeroed outside the image (so, after
    ReLU, is the max pool's input), which is exactly what the zero padding around the image
    alone gives each layer.
    """
    builds = getattr(model.conv, "func", model.conv)  # nn.Conv, or a functools.partial of it
    if not (isinstance(builds, type) and issubclass(builds, nn.Conv)):
        raise ValueError(f"multi-scale scoring masks nn.Conv layers; this model's conv is {model.conv!r}: "
                         "build it with nn.Conv (the default) or a functools.partial of nn.Conv")
    canvas = images.shape[1:3]

    def zero_outside_the_image(next_fun, args, kwargs, context):
        def masked(x):
            return x * inside(_valid_at(valid, canvas, x.shape[1:3]), *x.shape[1:3])[..., None]

        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Conv):
            return next_fun(masked(args[0]), *args[1:], **kwargs)
        if isinstance(context.module, BatchNorm):
            return masked(next_fun(*args, **kwargs))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(zero_outside_the_image):
        scores = model.apply(variables, images, train=False, output="spatial_logits")
    grid = scores.shape[1:3]
    return scores.astype(jnp.float32), inside(_valid_at(valid, canvas, grid), *grid)


def scale_probabilities(model: ResNet, variables: dict, views: jnp.ndarray, valid: jnp.ndarray,
                        average: str = "scores") -> jnp.ndarray:
    """(N, classes): one scale's probabilities per image, from views (N, V, H, W, C) (the
    image and its flip on their canvas) and each image's size `valid` (N, 2), averaged over
    the image's locations and the V views as `average` says."""
    n, v = views.shape[:2]
    scores, on_image = spatial_scores(model, variables, views.reshape(n * v, *views.shape[2:]),
                                      jnp.repeat(valid, v, axis=0))
    weights = on_image[..., None] / jnp.sum(on_image, axis=(1, 2))[:, None, None, None]
    if average == "scores":
        probabilities = jax.nn.softmax(jnp.sum(scores * weights, axis=(1, 2)), axis=-1)
    else:
        probabilities = jnp.sum(jax.nn.softmax(scores, axis=-1) * weights, axis=(1, 2))
    return probabilities.reshape(n, v, -1).mean(axis=1)


def class_scores(model: ResNet, variables: dict, views, mode: str, average: str = "scores") -> jnp.ndarray:
    """(N, classes) scores whose log-softmax is the mode's log-probability per image.

    views: "center" (N, H, W, C); "ten_crop" (N, 10, H, W, C); "multi_scale" a tuple, one
    per scale, of (canvases (N, 2, H, W, C), valid sizes (N, 2)). `average`: multi-scale's
    (`AVERAGES`).
    """
    if mode == "center":
        return model.apply(variables, views, train=False)
    if mode == "ten_crop":
        n, v = views.shape[:2]
        logits = model.apply(variables, views.reshape(n * v, *views.shape[2:]), train=False)
        return _log(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(n, v, -1).mean(axis=1))
    per_scale = [scale_probabilities(model, variables, canvases, valid, average) for canvases, valid in views]
    return _log(sum(per_scale) / len(per_scale))
