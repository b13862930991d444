"""The paper's networks: sizes, costs, shortcut semantics, options and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax as rj
from resnet_jax.models import RESPONSES, BatchNorm, shortcut_a


def param_shapes(model, size, channels=3):
    x = jnp.zeros((1, size, size, channels))
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def num_params(name, **overrides):
    model = rj.create_model(name, **overrides)
    size = 32 if model.stem == "cifar" else 224
    return rj.count_params(param_shapes(model, size)["params"])


# RESNET_PAPER.md: option A for CIFAR (10 classes), option B for ImageNet (1000 classes).
PAPER_PARAMS = {
    "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
    "resnet110": 1_727_962, "resnet1202": 19_421_274,
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
}


@pytest.mark.parametrize("name", PAPER_PARAMS)
def test_parameter_counts_equal_the_paper(name):
    assert num_params(name) == PAPER_PARAMS[name]


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_plain_nets_have_their_resnets_count(depth):
    assert num_params(f"plain{depth}") == PAPER_PARAMS[f"resnet{depth}"]


def projection(c_in, c_out):
    return c_in * c_out + 2 * c_out  # 1x1 conv without bias + BN scale and bias


def test_cifar_shortcut_b_and_c_add_the_projections_they_imply():
    n = 3  # ResNet-20
    b_extra = projection(16, 32) + projection(32, 64)
    c_extra = (
        n * projection(16, 16)
        + projection(16, 32) + (n - 1) * projection(32, 32)
        + projection(32, 64) + (n - 1) * projection(64, 64)
    )
    assert num_params("resnet20", shortcut="B") == PAPER_PARAMS["resnet20"] + b_extra
    assert num_params("resnet20", shortcut="C") == PAPER_PARAMS["resnet20"] + c_extra


def test_imagenet_shortcut_a_and_c_differ_from_b_by_the_projections():
    widths, blocks = (64, 128, 256, 512), (3, 4, 6, 3)  # ResNet-34
    b_only = sum(projection(widths[i - 1], widths[i]) for i in range(1, 4))
    c_all = sum(
        projection(widths[i - 1] if i and j == 0 else widths[i], widths[i])
        for i in range(4) for j in range(blocks[i])
    )
    b = PAPER_PARAMS["resnet34"]
    assert num_params("resnet34", shortcut="A") == b - b_only
    assert num_params("resnet34", shortcut="C") == b - b_only + c_all


@pytest.mark.parametrize(
    "name, size, expected_macs, overrides",
    [
        ("resnet18", 224, 1.81e9, {}),
        ("resnet34", 224, 3.66e9, {}),
        ("resnet50", 224, 4.09e9, {}),
        ("resnet50", 224, 3.86e9, {"stride_in_1x1": True}),
        ("resnet101", 224, 7.80e9, {}),
        ("resnet152", 224, 11.51e9, {}),
        ("resnet20", 32, 40.6e6, {}),
        ("resnet56", 32, 125.5e6, {}),
    ],
)
def test_multiply_adds_match_the_published_figures(name, size, expected_macs, overrides):
    macs = rj.count_macs(rj.create_model(name, **overrides), (1, size, size, 3))
    assert abs(macs - expected_macs) / expected_macs < 0.02


def test_macs_are_per_example_and_grow_with_the_image():
    model = rj.create_model("resnet20")
    one = rj.count_macs(model, (1, 32, 32, 3))
    assert rj.count_macs(model, (4, 32, 32, 3)) == one
    assert rj.count_macs(model, (1, 64, 64, 3)) > 3.9 * one


def test_shortcut_a_subsamples_and_zero_pads():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    out = shortcut_a(x, 8, 2)
    assert out.shape == (2, 3, 3, 8)
    np.testing.assert_array_equal(out[..., :3], x[:, ::2, ::2, :])
    np.testing.assert_array_equal(out[..., 3:], 0)


def test_option_a_block_passes_the_shortcut_at_a_width_change():
    # With the residual branch's last BN scale at zero (and bias zero) the block's output
    # is ReLU(shortcut(x)); for non-negative x that is the shortcut itself.
    block = rj.models.BasicBlock(features=8, strides=2, shortcut="A", zero_init_residual=True)
    x = jnp.abs(jax.random.normal(jax.random.key(2), (2, 8, 8, 4)))
    variables = block.init(jax.random.key(3), x)
    assert "shortcut_conv" not in variables["params"]
    out = block.apply(variables, x)
    expected = jnp.concatenate([x[:, ::2, ::2, :], jnp.zeros((2, 4, 4, 4))], axis=-1)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_plain_block_has_no_shortcut():
    plain = rj.create_model("plain8")
    resnet = rj.create_model("resnet8")
    x = jax.random.normal(jax.random.key(4), (2, 16, 16, 1))
    variables = resnet.init(jax.random.key(5), x)
    assert not np.allclose(plain.apply(variables, x), resnet.apply(variables, x))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size", [224, 256, 320])
def test_imagenet_nets_take_any_size(name, size):
    model = rj.create_model(name, num_classes=7)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = param_shapes(model, size)
    stages = jax.eval_shape(lambda v, x: model.apply(v, x, output="stages"), variables, x)
    reduction = {"conv2_x": 4, "conv3_x": 8, "conv4_x": 16, "conv5_x": 32}
    expansion = 4 if name == "resnet50" else 1
    for (stage, out), width in zip(stages.items(), (64, 128, 256, 512), strict=True):
        side = -(-size // reduction[stage])
        assert out.shape == (2, side, side, width * expansion)
    logits = jax.eval_shape(model.apply, variables, x)
    assert logits.shape == (2, 7)


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_cifar_nets_run_on_grayscale_and_rgb(size, channels):
    model = rj.create_model("resnet8")
    x = jax.random.uniform(jax.random.key(6), (2, size, size, channels))
    variables = model.init(jax.random.key(7), x)
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, channels, 16)
    logits = model.apply(variables, x)
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    stages = model.apply(variables, x, output="stages")
    assert [s.shape[1] for s in stages.values()] == [size, -(-size // 2), -(-size // 4)]


def test_spatial_logits_average_to_the_logits():
    model = rj.create_model("resnet8", num_classes=5)
    x = jax.random.normal(jax.random.key(8), (2, 32, 32, 3))
    variables = model.init(jax.random.key(9), x)
    spatial = model.apply(variables, x, output="spatial_logits")
    assert spatial.shape == (2, 8, 8, 5)
    np.testing.assert_allclose(spatial.mean(axis=(1, 2)), model.apply(variables, x), atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters():
    model = rj.create_model("resnet8", dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(10), x)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    assert model.apply(variables, x).dtype == jnp.bfloat16
    stages = model.apply(variables, x, output="stages")
    assert all(s.dtype == jnp.bfloat16 for s in stages.values())


def test_responses_are_collected_only_on_request():
    model = rj.create_model("resnet14")  # n = 2: 1 + 3 stages * 2 blocks * 2 = 13 layers
    x = jax.random.normal(jax.random.key(11), (2, 16, 16, 3))
    variables = model.init(jax.random.key(12), x)
    assert RESPONSES not in variables
    logits, state = model.apply(variables, x, mutable=[RESPONSES])
    responses = jax.tree_util.tree_leaves(state[RESPONSES])
    assert len(responses) == 13
    np.testing.assert_array_equal(logits, model.apply(variables, x))
    # After BN in eval mode at init (identity statistics) each response is BN(conv(.)),
    # i.e. has the conv's scale; before ReLU it takes negative values.
    assert all((r < 0).any() for r in responses)


def test_bottleneck_responses_are_its_3x3_layers():
    model = rj.create_model("resnet50", num_classes=3)
    x = jnp.ones((1, 64, 64, 3))
    state = jax.eval_shape(
        lambda v, x: model.apply(v, x, mutable=[RESPONSES])[1], param_shapes(model, 64), x
    )
    assert len(jax.tree_util.tree_leaves(state)) == 16  # one 3x3 per bottleneck block


def test_training_mode_updates_batch_statistics():
    model = rj.create_model("resnet8")
    x = jax.random.normal(jax.random.key(13), (4, 16, 16, 3)) + 3.0
    variables = model.init(jax.random.key(14), x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    before = variables["batch_stats"]["bn1"]["mean"]
    after = updates["batch_stats"]["bn1"]["mean"]
    batch_mean = jnp.mean(
        jax.lax.conv_general_dilated(
            x, variables["params"]["conv1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
        axis=(0, 1, 2),
    )
    np.testing.assert_allclose(after, 0.9 * before + 0.1 * batch_mean, rtol=1e-4, atol=1e-5)


def test_batch_norm_normalises_channels_whose_mean_dwarfs_their_spread():
    # A stem that passes the first input channel through (the centre tap: no padding read)
    # and inputs near 1000 with a spread of 0.1: E[x^2] - E[x]^2 loses every digit of the
    # variance in float32; the mean squared deviation keeps it.
    model = rj.create_model("resnet8")
    x = 1000.0 + 0.1 * jax.random.normal(jax.random.key(15), (8, 8, 8, 3))
    variables = model.init(jax.random.key(16), x)
    pass_through = jnp.zeros((3, 3, 3, 16)).at[1, 1, 0, :].set(1.0)
    params = {**variables["params"], "conv1": {"kernel": pass_through}}
    _, state = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats", RESPONSES])
    normalised = state[RESPONSES]["stem_response"][0]  # bn1's output: scale 1, bias 0
    np.testing.assert_allclose(jnp.mean(normalised, axis=(0, 1, 2)), 0.0, atol=1e-2)
    np.testing.assert_allclose(jnp.std(normalised, axis=(0, 1, 2)), 1.0, atol=2e-2)


def bn_variables(channels, key=0):
    """BN variables away from their initial values, so that each of them shows in the output."""
    keys = jax.random.split(jax.random.key(key), 4)
    return {
        "params": {"scale": 1 + 0.2 * jax.random.normal(keys[0], (channels,)),
                   "bias": 0.3 * jax.random.normal(keys[1], (channels,))},
        "batch_stats": {"mean": jax.random.normal(keys[2], (channels,)),
                        "var": 1 + jax.random.uniform(keys[3], (channels,))},
    }


def assert_trees_close(a, b, **tolerance):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **tolerance), a, b)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_batch_norm_over_one_group_computes_as_flax_batch_norm(dtype, tolerance):
    x = (3.0 + 2.0 * jax.random.normal(jax.random.key(1), (8, 4, 4, 5))).astype(dtype)
    variables = bn_variables(5)
    flax_bn = nn.BatchNorm(use_running_average=False, use_fast_variance=False, momentum=0.9, epsilon=1e-5,
                           dtype=dtype)
    expected, expected_stats = flax_bn.apply(variables, x, mutable=["batch_stats"])
    # The same variables, and the same outputs and running statistics, whether the one
    # group is the whole batch by default (0) or by its size (8).
    for group_size in (0, 8):
        bn = BatchNorm(group_size=group_size, dtype=dtype)
        key = jax.random.key(0)
        assert jax.eval_shape(bn.init, key, x) == jax.eval_shape(flax_bn.init, key, x)
        y, stats = bn.apply(variables, x, mutable=["batch_stats"])
        assert y.dtype == expected.dtype == dtype
        assert_trees_close(y.astype(jnp.float32), expected.astype(jnp.float32),
                           rtol=tolerance, atol=tolerance)
        assert_trees_close(stats, expected_stats, rtol=1e-5, atol=1e-6)
    # Evaluation normalises with the running statistics, whatever the groups.
    evaluated = BatchNorm(use_running_average=True, group_size=4, dtype=dtype).apply(variables, x)
    flax_evaluated = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype).apply(variables, x)
    assert_trees_close(evaluated.astype(jnp.float32), flax_evaluated.astype(jnp.float32), rtol=tolerance,
                       atol=tolerance)


def test_batch_norm_groups_normalise_on_their_own_statistics():
    # Two groups of 4 consecutive examples, with means and spreads far apart.
    spread, mean = (jnp.array(values).repeat(4)[:, None, None, None] for values in ([1.0, 5.0], [0.0, 10.0]))
    x = mean + spread * jax.random.normal(jax.random.key(2), (8, 4, 4, 5))
    variables = bn_variables(5)
    y, stats = BatchNorm(group_size=4).apply(variables, x, mutable=["batch_stats"])
    halves = [BatchNorm().apply(variables, x[i:i + 4], mutable=["batch_stats"]) for i in (0, 4)]
    assert_trees_close(y, jnp.concatenate([half[0] for half in halves]), rtol=1e-5, atol=1e-5)
    # The running statistics move toward the groups' statistics averaged over the groups.
    averaged = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
    assert_trees_close(stats, averaged, rtol=1e-5, atol=1e-6)
    # Each group is normalised: per channel, zero mean and unit spread before scale and bias.
    scale, bias = variables["params"]["scale"], variables["params"]["bias"]
    for group in (y[:4], y[4:]):
        standardised = (group - bias) / scale
        np.testing.assert_allclose(standardised.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
        np.testing.assert_allclose(standardised.std(axis=(0, 1, 2)), 1.0, atol=1e-3)
    # Over the whole batch the same examples come out otherwise.
    assert not np.allclose(BatchNorm().apply(variables, x, mutable=["batch_stats"])[0], y, atol=0.1)


def test_bn_groups_normalise_each_group_of_a_net_on_its_own():
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3)) + jnp.arange(8.0)[:, None, None, None]
    variables = rj.create_model("resnet8").init(jax.random.key(1), x)
    logits, stats = rj.create_model("resnet8", bn_group_size=4).apply(variables, x, train=True,
                                                                      mutable=["batch_stats"])
    whole_net = rj.create_model("resnet8")
    halves = [whole_net.apply(variables, x[i:i + 4], train=True, mutable=["batch_stats"]) for i in (0, 4)]
    np.testing.assert_allclose(logits, jnp.concatenate([half[0] for half in halves]), rtol=1e-5, atol=1e-5)
    averaged = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
    assert_trees_close(stats, averaged, rtol=1e-5, atol=1e-6)
    whole_batch, _ = whole_net.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(whole_batch, logits, atol=1e-3)
    # Evaluation uses the running statistics: groups change nothing there.
    np.testing.assert_array_equal(rj.create_model("resnet8", bn_group_size=4).apply(variables, x),
                                  whole_net.apply(variables, x))


def test_bn_groups_change_no_parameter_or_statistic():
    grouped = param_shapes(rj.create_model("resnet50", bn_group_size=32), 224)
    assert grouped == param_shapes(rj.create_model("resnet50"), 224)
    assert rj.count_params(grouped["params"]) == PAPER_PARAMS["resnet50"]


def test_a_bn_group_size_that_does_not_divide_the_batch_is_refused():
    x = jnp.zeros((8, 4, 4, 5))
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the batch of 8 .*divisor of 8"):
        BatchNorm(group_size=3).init_with_output(jax.random.key(0), x)


def test_zero_init_residual_zeroes_the_last_bn_of_each_branch():
    for name, last_bn in (("resnet8", "bn2"), ("resnet50", "bn3")):
        model = rj.create_model(name, zero_init_residual=True)
        params = param_shapes(model, 32)["params"]
        block_names = [k for k in params if k.startswith("conv") and "_" in k]
        concrete = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
        for block in block_names:
            np.testing.assert_array_equal(concrete[block][last_bn]["scale"], 0)
        if name == "resnet8":
            np.testing.assert_array_equal(concrete["conv2_1"]["bn1"]["scale"], 1)


def test_convolutions_use_he_fan_out_init():
    model = rj.create_model("resnet8", num_classes=10)
    params = model.init(jax.random.key(15), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = params["conv4_1"]["conv2"]["kernel"]  # 3x3, 64 -> 64
    assert abs(float(kernel.std()) - np.sqrt(2.0 / (9 * 64))) < 0.01


def test_named_models_and_defaults():
    names = rj.list_models()
    for name in [f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110, 1202, 18, 34, 50, 101, 152)]:
        assert name in names
    for name in [f"plain{d}" for d in (8, 14, 20, 32, 44, 56, 110, 18, 34, 50, 101, 152)]:
        assert name in names
    assert rj.model_spec("resnet20")["shortcut"] == "A"
    assert rj.model_spec("resnet26")["stage_sizes"] == (4, 4, 4)
    spec = rj.model_spec("resnet50")  # 50 = 6n+2 too: the ImageNet net wins
    assert spec["family"] == "imagenet" and spec["shortcut"] == "B"
    assert not rj.model_spec("plain34")["residual"]
    assert rj.create_model("resnet50").stride_in_1x1 is False  # v1.5 by default


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: rj.create_model("resnet21"), ["21", "6n+2", "18, 34, 50, 101, 152"]),
        (lambda: rj.create_model("vgg16"), ["'vgg16'", "resnet20", "resnet50"]),
        (lambda: rj.create_model("resnet20", shortcut="D"), ["shortcut='D'", "'A', 'B', 'C'"]),
        (lambda: rj.create_model("plain20", shortcut="B"), ["plain", "shortcut"]),
        (lambda: rj.create_model("resnet20", num_clases=10), ["num_clases", "num_classes"]),
        (lambda: rj.create_model("plain20", zero_init_residual=True), ["zero_init_residual"]),
        (lambda: rj.create_model("resnet20", conv=3), ["conv=3", "nn.Conv"]),
        (lambda: rj.create_model("resnet20", bn_group_size=-1), ["bn_group_size=-1", "0 (BN statistics"]),
    ],
)
def test_bad_arguments_name_the_value_and_the_choices(call, words):
    with pytest.raises(ValueError) as error:
        call()
    for word in words:
        assert word in str(error.value)


def test_every_convolution_is_built_by_the_conv_module():
    calls = []

    def recording_conv(*args, **kwargs):
        calls.append(kwargs["name"])
        return nn.Conv(*args, **kwargs)

    x = jnp.zeros((1, 16, 16, 3))
    for name, convolutions in (("resnet8", 7), ("resnet18", 1 + 8 * 2 + 3)):  # stem, blocks, projections
        model = rj.create_model(name, conv=recording_conv)
        calls.clear()
        jax.eval_shape(model.init, jax.random.key(0), x)
        assert len(calls) == convolutions, calls
        plain = jax.eval_shape(rj.create_model(name).init, jax.random.key(0), x)
        assert jax.eval_shape(model.init, jax.random.key(0), x) == plain  # the same layers


def test_bad_output_is_refused():
    model = rj.create_model("resnet8")
    x = jnp.zeros((1, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="output='features'.*'logits', 'spatial_logits', 'stages'"):
        model.apply(variables, x, output="features")
