"""The paper's testing protocols on a fully-convolutional net: ten-crop and multi-scale
scores equal the averages of separately computed per-crop and per-scale scores."""

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import scoring
from resnet_jax.models import create_model


def model_and_variables():
    model = create_model("resnet8", num_classes=5)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    # Non-trivial BN statistics (eval-mode BN is not the identity) and a larger FC (the
    # freshly initialised one gives near-uniform softmaxes, where any average agrees).
    params = {**variables["params"], "fc": {**variables["params"]["fc"],
                                            "kernel": 30 * variables["params"]["fc"]["kernel"]}}
    variables = {"params": params, "batch_stats": jax.tree_util.tree_map(
        lambda s: s + 0.3, variables["batch_stats"])}
    return model, variables


def test_multi_scale_scores_are_the_average_of_each_scales_own_scores():
    model, variables = model_and_variables()
    keys = jax.random.split(jax.random.key(1), 2)
    views = tuple(jax.random.normal(k, (2, 2, side, side, 3)) for k, side in zip(keys, (32, 48), strict=True))
    combined = jax.nn.softmax(scoring.class_scores(model, variables, views, "multi_scale"))
    per_scale = []
    for scale_views in views:  # each scale alone: every location's softmax, averaged
        flips = []
        for flip in range(2):
            spatial = model.apply(variables, scale_views[:, flip], output="spatial_logits")
            flips.append(jax.nn.softmax(spatial, axis=-1).mean(axis=(1, 2)))
        per_scale.append((flips[0] + flips[1]) / 2)
    np.testing.assert_allclose(combined, sum(per_scale) / 2, rtol=1e-5, atol=1e-7)
    # Not the same as averaging logits: the per-location softmax matters.
    pooled = (jax.nn.softmax(model.apply(variables, views[1][:, 0]))
              + jax.nn.softmax(model.apply(variables, views[1][:, 1]))) / 2
    assert not np.allclose(per_scale[1], pooled, atol=1e-4)


def test_ten_crop_scores_are_the_average_softmax_of_the_crops():
    model, variables = model_and_variables()
    views = jax.random.normal(jax.random.key(2), (2, 10, 32, 32, 3))
    combined = jax.nn.softmax(scoring.class_scores(model, variables, views, "ten_crop"))
    separate = [jax.nn.softmax(model.apply(variables, views[:, i])) for i in range(10)]
    np.testing.assert_allclose(combined, sum(separate) / 10, rtol=1e-5, atol=1e-7)


def test_center_scores_are_the_logits():
    model, variables = model_and_variables()
    images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    np.testing.assert_array_equal(scoring.class_scores(model, variables, images, "center"),
                                  model.apply(variables, images))
