"""The fast convolution paths compute what XLA's own convolution and its gradients compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import resnet_jax as rj
from resnet_jax import backend
from resnet_jax import config as config_lib
from resnet_jax.cpu import fast_conv, native_conv
from resnet_jax.data import memory
from resnet_jax.data.sources import Split
from resnet_jax.parallel import data_parallel
from resnet_jax.state import build_model, init_state
from resnet_jax.train import make_train_step

# What nn.Conv passes for NHWC inputs and HWIO kernels.
NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
RTOL = 1e-5

# (batch, height, width, in channels, out channels, kernel, stride, padding)
SHAPES = [
    (2, 8, 8, 3, 4, 3, 1, ((1, 1), (1, 1))),  # the CIFAR stem: 3 input channels
    (2, 9, 7, 1, 5, 3, 2, ((1, 1), (1, 1))),  # one input channel, odd sizes, stride 2
    (2, 8, 8, 4, 8, 3, 2, ((1, 1), (1, 1))),  # a downsampling 3x3
    (2, 8, 8, 4, 6, 1, 2, ((0, 0), (0, 0))),  # a projection shortcut
    (2, 6, 6, 4, 6, 1, 1, ((0, 0), (0, 0))),  # a bottleneck's 1x1
    (1, 13, 13, 3, 4, 7, 2, ((3, 3), (3, 3))),  # the ImageNet stem
    (2, 10, 10, 3, 4, 3, 2, "SAME"),  # XLA's asymmetric padding
    (2, 13, 11, 2, 3, 5, 3, ((2, 0), (1, 2))),  # stride 3: input rows no window reads
    (2, 10, 10, 3, 4, 3, 1, "VALID"),
    (19, 5, 5, 3, 4, 3, 1, ((1, 1), (1, 1))),  # a batch of one full chunk and a partial one
    # Multiples of 16 output channels: the native kernels (`native_conv`) on "auto".
    (4, 8, 8, 16, 16, 3, 1, ((1, 1), (1, 1))),  # ResNet-20's first stage
    (3, 9, 7, 16, 32, 3, 2, ((1, 1), (1, 1))),  # downsampling, odd sizes
    (2, 8, 8, 48, 64, 3, 1, ((1, 1), (1, 1))),  # tiles of 64 channels; 48 for the input gradient
    (2, 8, 8, 32, 16, 1, 2, ((0, 0), (0, 0))),  # a strided 1x1: its input gradient stays XLA's
    (2, 6, 6, 16, 32, 1, 1, ((0, 0), (0, 0))),
    (2, 13, 13, 3, 16, 7, 2, ((3, 3), (3, 3))),  # the ImageNet stem, 3 input channels
    (2, 10, 10, 16, 16, 3, 2, "SAME"),
    (2, 13, 11, 16, 32, 5, 3, ((2, 0), (1, 2))),
    (3, 10, 10, 32, 16, 3, 1, "VALID"),
    (2, 6, 6, 16, 16, 3, 1, ((2, 0), (0, 2))),  # windows past one edge only
    (2, 3, 40, 16, 16, 3, 1, ((1, 1), (1, 1))),  # a row wider than one register tile
    (19, 5, 5, 16, 16, 3, 1, ((1, 1), (1, 1))),  # the weight gradient's 16 parts, uneven
]


def close(actual, expected):
    """Equal up to float32 rounding, relative to the scale of `expected`."""
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("path", ["auto", "shifted"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])) + f"-{s[7]}"[:6])
def test_forward_and_both_gradients_equal_xla(path, shape):
    batch, height, width, c_in, c_out, kernel, stride, padding = shape
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, height, width, c_in))
    w = jax.random.normal(keys[1], (kernel, kernel, c_in, c_out))

    def conv_with(fn):
        return lambda x, w: fn(x, w, (stride, stride), padding, dimension_numbers=NHWC)

    expected, xla_vjp = jax.vjp(conv_with(lax.conv_general_dilated), x, w)
    actual, fast_vjp = jax.vjp(jax.jit(conv_with(fast_conv.conv_general_dilated_for(path))), x, w)
    grad_out = jax.random.normal(keys[2], expected.shape)
    close(actual, expected)
    for fast, xla in zip(fast_vjp(grad_out), xla_vjp(grad_out), strict=True):
        assert fast.shape == xla.shape
        close(fast, xla)


def native_calls(conv_fn, x, w, stride=1, padding=((1, 1), (1, 1))) -> int:
    """How many native kernel calls the compiled forward and backward pass make."""
    def loss(x, w):
        return jnp.sum(conv_fn(x, w, (stride, stride), padding, dimension_numbers=NHWC) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text().count("resnet_jax_conv")


@pytest.fixture
def native_kernels():
    if not native_conv.available():
        pytest.skip("the native CPU convolutions could not be built here (see the warning logged)")


@pytest.mark.native
def test_auto_runs_the_native_kernels_where_they_apply(native_kernels):
    auto = fast_conv.conv_general_dilated_for("auto")
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 32))
    assert native_calls(auto, x, w) == 3  # forward, input and weight gradients
    assert native_calls(auto, x, w, stride=2) == 3  # the input gradient after space-to-depth
    assert native_calls(auto, x[..., :3], w[:, :, :3]) == 2  # 3 input channels: not the input gradient
    assert native_calls(auto, x, w[..., :24]) == 0  # 24 output channels
    assert native_calls(auto, jnp.ones((2, 4, 4, 256)), jnp.ones((1, 1, 256, 1024))) == 0  # a 1 MiB kernel
    assert native_calls(auto, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)) == 0
    assert native_calls(auto, x, w, padding=((3, 0), (0, 3))) == 2  # the input gradient's padding < 0
    assert native_calls(fast_conv.conv_general_dilated_for("shifted"), x, w) == 0


@pytest.mark.native
def test_native_results_do_not_depend_on_thread_timing(native_kernels):
    x = jax.random.normal(jax.random.key(0), (32, 16, 16, 16))
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
    grads = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(fast_conv.conv_general_dilated_for("auto")(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))), argnums=(0, 1)))
    first = grads(x, w)
    for _ in range(3):
        jax.tree_util.tree_map(np.testing.assert_array_equal, grads(x, w), first)


def test_without_a_compiler_the_native_kernels_are_off_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent")
    native_conv.available.cache_clear()
    try:
        assert not native_conv.available()
        assert "no C++ compiler 'no-such-compiler'" in caplog.text
        assert native_calls(fast_conv.conv_general_dilated_for("auto"), jnp.ones((2, 8, 8, 16)),
                            jnp.ones((3, 3, 16, 16))) == 0
    finally:
        native_conv.available.cache_clear()


@pytest.mark.native
def test_the_kernels_are_built_once_per_source_and_cpu(native_kernels, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    library = native_conv._build()
    assert library.parent == tmp_path / "resnet_jax" and library.suffix == ".so"
    assert [p.name for p in library.parent.iterdir()] == [library.name]  # no temporary left over
    built_at = library.stat().st_mtime_ns
    assert native_conv._build() == library and library.stat().st_mtime_ns == built_at
    monkeypatch.setattr(native_conv, "FLAGS", (*native_conv.FLAGS, "-DRESNET_JAX_TEST"))
    rebuilt = native_conv._build()
    assert rebuilt != library and rebuilt.exists()


def test_auto_is_xla_off_the_cpu(monkeypatch):
    assert fast_conv.conv_general_dilated_for("xla") is lax.conv_general_dilated
    assert fast_conv.conv_general_dilated_for("auto") is not lax.conv_general_dilated  # the tests run on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert fast_conv.conv_general_dilated_for("auto") is lax.conv_general_dilated
    assert fast_conv.conv_general_dilated_for("shifted") is not lax.conv_general_dilated


def test_cpu_paths_compile_with_ynnpack_for_reductions_only(monkeypatch):
    ynn_reductions_only = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    assert fast_conv.compiler_options("auto") == ynn_reductions_only  # the tests run on CPU
    assert fast_conv.compiler_options("shifted") == ynn_reductions_only
    assert fast_conv.compiler_options("xla") == {}
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert fast_conv.compiler_options("auto") == {}


def test_an_xla_without_the_ynnpack_option_gets_no_options(monkeypatch):
    monkeypatch.setattr(fast_conv, "_YNN_REDUCTIONS_ONLY", (("xla_cpu_no_such_option", "1"),))
    fast_conv._has_ynn_option.cache_clear()
    try:
        assert fast_conv.compiler_options("auto") == {}
    finally:
        fast_conv._has_ynn_option.cache_clear()


def test_parameter_trees_are_identical_on_every_path():
    """Same names, shapes and initial values: checkpoints and torchvision weights fit every path."""
    x = jnp.zeros((1, 32, 32, 3))
    for name in ("resnet8", "resnet18"):  # option A; the 7x7 stem and 1x1 projections
        models = [rj.create_model(name, conv=backend.conv_module(path)) for path in fast_conv.CONV_PATHS]
        trees = [jax.eval_shape(model.init, jax.random.key(0), x) for model in models]
        assert all(tree == trees[0] for tree in trees)
    models = {path: rj.create_model("resnet8", conv=backend.conv_module(path))
              for path in ("auto", "xla")}  # "shifted" builds its layers as "auto" does
    values = {path: jax.jit(model.init)(jax.random.key(0), x) for path, model in models.items()}
    jax.tree_util.tree_map(np.testing.assert_array_equal, values["auto"], values["xla"])


def random_device_data(parallel, num_examples: int = 16, size: int = 16) -> memory.DeviceData:
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (num_examples, size, size, 3), dtype=np.uint8),
                  rng.integers(0, 10, num_examples).astype(np.int32), 10)
    mean = split.images.mean(axis=0).astype(np.float32) / 255
    return memory.put_on_devices(split, mean, np.ones(3, np.float32), parallel.replicated)


def one_train_step(conv: str):
    """One step of the project's training step (data on the device), ResNet-8."""
    config = config_lib.cifar_recipe("resnet8")
    config.batch_size = 8
    config.model.conv = conv
    parallel = data_parallel()
    model = build_model(config)
    state = init_state(config, model, jax.random.key(0))
    return make_train_step(config, model, parallel)(state, random_device_data(parallel), jax.random.key(1))


def test_a_resnet8_training_step_is_the_same_on_every_path():
    """Through the whole network (stem, stride-2 blocks, BN, option A). After one step
    SGD's momentum trace is the gradient (plus the same weight decay): compare it leaf by leaf."""
    expected_state, expected_metrics = one_train_step("xla")
    for path in ("auto", "shifted"):
        state, metrics = one_train_step(path)
        close(metrics["loss"], expected_metrics["loss"])
        jax.tree_util.tree_map(close, state.opt_state, expected_state.opt_state)
        jax.tree_util.tree_map(close, state.params, expected_state.params)
