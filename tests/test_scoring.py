"""The paper's testing protocols on a fully-convolutional net: ten-crop scores are the
average of the crops'; multi-scale scores each whole image on its padded canvas exactly as
the image alone, in both places the softmax can go, and average the scales."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import scoring
from resnet_jax.data import augment, stream
from resnet_jax.models import ResNet, create_model

# Tiny nets with every layer kind the masking must handle: the CIFAR stem and option A;
# the ImageNet stem (7x7/2 conv, 3x3/2 max pool) with option B; v1 bottlenecks.
TINY_NETS = {
    "cifar_a": lambda: create_model("resnet8", num_classes=5),
    "imagenet_basic_b": lambda: ResNet(stage_sizes=(1, 1), block="basic", stem="imagenet", widths=(8, 16),
                                       shortcut="B", num_classes=5),
    "imagenet_bottleneck_v1": lambda: ResNet(stage_sizes=(1, 1), block="bottleneck", stem="imagenet",
                                             widths=(4, 8), stride_in_1x1=True, num_classes=5),
}


def with_variables(model):
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    # Non-trivial BN statistics (eval-mode BN is not the identity, and its shift is what
    # padding would leak) and a larger FC (a fresh one gives near-uniform softmaxes, where
    # any average agrees).
    params = {**variables["params"], "fc": {**variables["params"]["fc"],
                                            "kernel": 30 * variables["params"]["fc"]["kernel"]}}
    keys = iter(jax.random.split(jax.random.key(1), 1000))

    def statistic(path, value):
        if path[-1].key == "mean":
            return value + 0.3 * jax.random.normal(next(keys), value.shape)
        return value * jax.random.uniform(next(keys), value.shape, minval=0.5, maxval=1.5)

    batch_stats = jax.tree_util.tree_map_with_path(statistic, variables["batch_stats"])
    return model, {"params": params, "batch_stats": batch_stats}


def model_and_variables():
    return with_variables(TINY_NETS["cifar_a"]())


def per_pixel_normalization():
    mean = jax.random.uniform(jax.random.key(4), (16, 16, 3))
    return stream.Normalization(mean=mean, std=jnp.asarray([0.5, 0.6, 0.7]))


def alone(model, variables, image, side, norm):
    """One scale's probabilities of one image scored on its own, by average: resized, the
    image and its flip normalised with the mean image resized to them (as training
    normalises flipped crops), through the net."""
    resized = augment.resize_shorter(image, side)
    mean = jax.image.resize(norm.mean, (*resized.shape[:2], 3), "bilinear")
    views = jnp.stack([resized, resized[:, ::-1]])
    spatial = apply_jitted(model, variables, augment.normalize(views, mean, norm.std))
    return {
        # The spatial mean of the score map is the net's own global-pool logits.
        "scores": jax.nn.softmax(spatial.mean(axis=(1, 2))).mean(axis=0),
        "probabilities": jax.nn.softmax(spatial).mean(axis=(1, 2)).mean(axis=0),
    }


@functools.partial(jax.jit, static_argnums=0)
def apply_jitted(model, variables, images):
    return model.apply(variables, images, output="spatial_logits")


@functools.partial(jax.jit, static_argnums=0)
def both_averages(model, variables, views, valid):  # one compilation per shape for both
    return {average: scoring.scale_probabilities(model, variables, views, valid, average)
            for average in scoring.AVERAGES}

# Two landscape images of one bucket (4:3) with different sizes, and a portrait one: odd
# and even sizes at every layer, so each stride-2 layer meets both.
IMAGE_SHAPES = [[(30, 40), (33, 40)], [(41, 30)]]


@pytest.mark.grain  # resizing uses pillow
@pytest.mark.parametrize("net", sorted(TINY_NETS))
def test_each_image_on_its_canvas_scores_as_the_image_alone_at_every_scale(net):
    model, variables = with_variables(TINY_NETS[net]())
    norm, sizes = per_pixel_normalization(), (24, 37)
    rng = np.random.default_rng(0)
    for shapes in IMAGE_SHAPES:  # one batch per bucket
        images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
        per_image = [augment.multi_scale_views(image, sizes) for image in images]
        valid = np.stack([v for _, v in per_image])
        for i, side in enumerate(sizes):
            canvases = jnp.asarray(np.stack([views[i] for views, _ in per_image]))
            x = stream.normalize_canvases(canvases, jnp.asarray(valid[:, i]), norm)
            expected = [alone(model, variables, image, side, norm) for image in images]
            assert all(np.ptp(e["scores"]) > 0.05 for e in expected)  # not all alike: a real test
            scored = both_averages(model, variables, x, jnp.asarray(valid[:, i]))
            for average in scoring.AVERAGES:
                for n, image in enumerate(images):
                    np.testing.assert_allclose(scored[average][n], expected[n][average], rtol=2e-5, atol=1e-6,
                                               err_msg=f"{net}, {average}, image {image.shape}, scale {side}")


def test_without_masking_inside_the_net_the_padding_would_leak_into_the_score():
    model, variables = model_and_variables()
    image = jax.random.normal(jax.random.key(5), (1, 20, 26, 3))
    canvas = jnp.zeros((1, 20, 32, 3)).at[:, :, :26].set(image)
    valid = jnp.asarray([[20, 26]])
    scores, inside = scoring.spatial_scores(model, variables, canvas, valid)
    # ResNet-8's score map is 1/4 of the input: 5 x 8 of the canvas, 5 x 7 of the image.
    assert inside.shape == (1, 5, 8) and inside[0, :, :7].all() and not inside[0, :, 7].any()
    np.testing.assert_allclose(scores[:, :, :7], model.apply(variables, image, output="spatial_logits"),
                               rtol=1e-5, atol=1e-5)
    naive = model.apply(variables, canvas, output="spatial_logits")[:, :, :7]
    assert not np.allclose(naive, scores[:, :, :7], atol=1e-3)  # the test above can fail


def test_the_two_averages_differ_and_multi_scale_averages_the_scales():
    model, variables = model_and_variables()
    keys = jax.random.split(jax.random.key(1), 2)
    views = tuple((jax.random.normal(k, (2, 2, side, side + 4, 3)), jnp.asarray([[side, side + 4]] * 2))
                  for k, side in zip(keys, (32, 48), strict=True))
    per_average = {}
    for average in scoring.AVERAGES:
        combined = jax.nn.softmax(scoring.class_scores(model, variables, views, "multi_scale", average))
        per_scale = [scoring.scale_probabilities(model, variables, x, valid, average) for x, valid in views]
        np.testing.assert_allclose(combined, sum(per_scale) / 2, rtol=1e-5, atol=1e-7)
        per_average[average] = combined
    # Softmax before or after the spatial average: not the same numbers.
    assert not np.allclose(per_average["scores"], per_average["probabilities"], atol=1e-4)


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


def test_multi_scale_refuses_a_model_whose_convolutions_it_cannot_mask():
    model, variables = model_and_variables()
    custom = model.clone(conv=lambda *args, **kwargs: model.conv(*args, **kwargs))
    with pytest.raises(ValueError, match="masks nn.Conv layers"):
        scoring.spatial_scores(custom, variables, jnp.zeros((1, 8, 8, 3)), jnp.asarray([[8, 6]]))
