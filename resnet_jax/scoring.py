"""How a batch of evaluation views becomes class scores: the paper's testing protocols.

- "center": one crop per image; its logits.
- "ten_crop": ten crops per image (Sec. 3.4's comparisons); the softmax averaged over them.
- "multi_scale": the fully-convolutional net (Sec. 3.4's best results) on each scale's view
  and its flip; the softmax of every location's class scores averaged over the locations
  and the flips, then over the scales.
Multi-view modes return the log of the averaged probabilities, so the same loss and
top-k errors (`metrics.classification_metrics`) apply to every mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from resnet_jax.models import ResNet

MODES = ("center", "ten_crop", "multi_scale")


def _log(probabilities: jnp.ndarray) -> jnp.ndarray:
    # An averaged probability can underflow to 0; its log stays finite (as a loss).
    return jnp.log(jnp.maximum(probabilities, jnp.finfo(jnp.float32).tiny))


def scale_probabilities(model: ResNet, variables: dict, views: jnp.ndarray) -> jnp.ndarray:
    """(N, classes): for views (N, V, H, W, C), the softmax of the class scores at every
    location of the last stage, averaged over the locations and the V views."""
    n, v = views.shape[:2]
    scores = model.apply(variables, views.reshape(n * v, *views.shape[2:]), train=False,
                         output="spatial_logits")
    probabilities = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    return probabilities.reshape(n, -1, probabilities.shape[-1]).mean(axis=1)


def class_scores(model: ResNet, variables: dict, views, mode: str) -> jnp.ndarray:
    """(N, classes) scores whose log-softmax is the mode's log-probability per image.

    views: "center" (N, H, W, C); "ten_crop" (N, 10, H, W, C); "multi_scale" a tuple of
    (N, 2, S, S, C), one per scale.
    """
    if mode == "center":
        return model.apply(variables, views, train=False)
    if mode == "ten_crop":
        n, v = views.shape[:2]
        logits = model.apply(variables, views.reshape(n * v, *views.shape[2:]), train=False)
        return _log(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(n, v, -1).mean(axis=1))
    per_scale = [scale_probabilities(model, variables, scale_views) for scale_views in views]
    return _log(sum(per_scale) / len(per_scale))
