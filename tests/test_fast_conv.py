"""The fast convolution paths compute what XLA's own convolution and its gradients compute."""

import functools
import json
import os
import pathlib
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import resnet_jax as rj
from resnet_jax import backend
from resnet_jax import config as config_lib
from resnet_jax.cpu import conv_choice, fast_conv, native_conv
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


def conv_with(fn, stride, padding):
    return lambda x, w: fn(x, w, (stride, stride), padding, dimension_numbers=NHWC)


def random_problem(shape):
    batch, height, width, c_in, c_out, kernel, stride, padding = shape
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, height, width, c_in))
    w = jax.random.normal(keys[1], (kernel, kernel, c_in, c_out))
    expected, xla_vjp = jax.vjp(conv_with(lax.conv_general_dilated, stride, padding), x, w)
    grad_out = jax.random.normal(keys[2], expected.shape)
    return x, w, grad_out, expected, xla_vjp(grad_out)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])) + f"-{s[7]}"[:6])
def test_auto_equals_xla(shape):
    x, w, grad_out, expected, expected_grads = random_problem(shape)
    auto = conv_with(fast_conv.conv_general_dilated_for("auto"), *shape[6:])
    actual, fast_vjp = jax.vjp(jax.jit(auto), x, w)
    close(actual, expected)
    for fast, xla in zip(fast_vjp(grad_out), expected_grads, strict=True):
        assert fast.shape == xla.shape
        close(fast, xla)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:7])) + f"-{s[7]}"[:6])
def test_every_formulation_of_every_part_equals_xla(shape):
    """Whichever formulation "auto" chooses for a part, the result is XLA's (to rounding);
    "native" runs the native kernels where they apply (and XLA's convolutions elsewhere)."""
    x, w, grad_out, expected, (expected_input_grad, expected_weight_grad) = random_problem(shape)
    stride, padding = shape[6:]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], (stride, stride), padding)
    arguments = {"forward": (x, w), "input_grad": (grad_out, w), "weight_grad": (x, grad_out)}
    results = {"forward": expected, "input_grad": expected_input_grad, "weight_grad": expected_weight_grad}
    for part in fast_conv.PARTS:
        for name in fast_conv.FORMULATIONS[part]:
            fn = fast_conv.formulation(part, name, x.shape, w.shape, (stride, stride), padding)
            actual = jax.jit(fn)(*arguments[part])
            assert actual.shape == results[part].shape, (part, name)
            close(actual, results[part])


def native_calls(conv_fn, x, w, stride=1, padding=((1, 1), (1, 1))) -> int:
    """How many native kernel calls the compiled forward and backward pass make."""
    def loss(x, w):
        return jnp.sum(conv_fn(x, w, (stride, stride), padding, dimension_numbers=NHWC) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text().count("resnet_jax_conv")


@pytest.fixture
def native_kernels():
    if not native_conv.available():
        pytest.skip("the native CPU convolutions could not be built here (see the warning logged)")


@pytest.fixture
def fake_timings(monkeypatch, tmp_path):
    """Every convolution measured, in an empty cache, with the timings a test sets: each
    formulation's milliseconds by name, the same for every part and shape. Records the
    candidates each measurement was given."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(fast_conv, "MIN_MEASURED_MACS", 0)
    timings, measured = {}, []

    def measure(candidates, compiler_options):
        measured.append(tuple(candidates))
        return {name: timings[name] for name in candidates}

    monkeypatch.setattr(conv_choice, "measure", measure)
    return timings, measured


@pytest.mark.native
def test_auto_runs_the_native_kernels_where_they_are_measured_faster(native_kernels, fake_timings):
    timings, measured = fake_timings
    auto = fast_conv.conv_general_dilated_for("auto")
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 32))
    timings.update(xla=2.0, space_to_depth=2.0, conv=2.0, shifted=3.0, native=1.0)  # a CPU where they win
    assert native_calls(auto, x, w) == 3  # forward, input and weight gradients
    assert measured == [("xla", "native"), ("xla", "native"), ("conv", "shifted", "native")]
    assert native_calls(auto, x, w, stride=2) == 3  # the input gradient after space-to-depth
    assert native_calls(auto, x[..., :3], w[:, :, :3]) == 2  # 3 input channels: not the input gradient
    assert native_calls(auto, x, w[..., :24]) == 1  # 24 output channels: only the input gradient
    assert native_calls(auto, jnp.ones((2, 4, 4, 256)), jnp.ones((1, 1, 256, 1024))) == 0  # a 1 MiB kernel
    assert native_calls(auto, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)) == 0
    assert native_calls(auto, x, w, padding=((3, 0), (0, 3))) == 2  # the input gradient's padding < 0
    assert ("xla",) not in measured  # a part with one candidate is not measured


def hlo_of_auto(x, w):
    def loss(x, w):
        return jnp.sum(fast_conv.conv_general_dilated_for("auto")(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()


def test_auto_takes_what_is_measured_fastest_on_each_cpu(fake_timings, monkeypatch):
    """The same layer on two kinds of CPU (their flags mocked, as their timings): each
    gets its own measured choice, cached apart, and each is read back unmeasured."""
    timings, measured = fake_timings
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    cpus = {  # flags, what wins there (as measured on the project's AVX-512 and AVX2 machines)
        "avx512": (b"flags : avx2 fma avx512f", dict(xla=2.0, conv=2.0, shifted=3.0, native=1.0)),
        "avx2": (b"flags : avx2 fma", dict(xla=1.0, conv=5.0, shifted=2.0, native=4.0)),
    }
    for flags, cpu_timings in cpus.values():
        monkeypatch.setattr(native_conv, "cpu_description", lambda flags=flags: flags)
        conv_choice._digest.cache_clear()
        timings.clear()
        timings.update(cpu_timings)
        hlo = hlo_of_auto(x, w)
        native = native_conv.available()
        assert hlo.count("resnet_jax_conv") == (3 if native and cpu_timings["native"] == 1.0 else 0)
        # The shifted weight gradient's einsums (dot products) where they are measured fastest.
        assert ("dot(" in hlo or "dot_general" in hlo) == (cpu_timings["shifted"] == 2.0)
    conv_choice._digest.cache_clear()
    files = list((pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "resnet_jax").glob("conv_choices-*.json"))
    assert len(files) == 2
    count = len(measured)
    for flags, _ in cpus.values():
        monkeypatch.setattr(native_conv, "cpu_description", lambda flags=flags: flags)
        conv_choice._digest.cache_clear()
        timings.clear()  # a measurement now would fail
        hlo_of_auto(x, w)
    assert len(measured) == count
    conv_choice._digest.cache_clear()


def test_small_convolutions_take_xla_unmeasured(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(conv_choice, "measure", lambda *args: pytest.fail("measured"))
    x, w = jax.ShapeDtypeStruct((2, 8, 8, 16), jnp.float32), jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32)
    pads = ((1, 1), (1, 1))
    assert [fast_conv.choice(part, x, w, (1, 1), pads) for part in fast_conv.PARTS] == ["xla", "xla", "conv"]


def test_a_choice_is_measured_once_and_then_read_from_the_cache(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def measure(candidates, compiler_options):
        calls.append(candidates)
        return {"a": 2.0, "b": 1.0}

    monkeypatch.setattr(conv_choice, "measure", measure)
    candidates = {"a": (None, ()), "b": (None, ())}
    assert conv_choice.choose("layer", candidates, {}) == "b"
    assert conv_choice.choose("layer", candidates, {}) == "b" and len(calls) == 1
    path = conv_choice.cache_path()
    assert json.loads(path.read_text()) == {"layer": {"choice": "b", "ms": {"a": 2.0, "b": 1.0}}}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left over
    # A key another process wrote first is kept: what the cache says is what runs.
    assert conv_choice._add(path, "layer", {"choice": "a", "ms": {}})["choice"] == "b"
    assert conv_choice.choose("one candidate", {"a": (None, ())}, {}) == "a" and len(calls) == 1
    path.write_text("{damaged")
    assert conv_choice.choose("layer", candidates, {}) == "b" and len(calls) == 2
    assert "ignoring the convolution choices" in caplog.text
    assert json.loads(path.read_text())["layer"]["choice"] == "b"


def test_measuring_runs_inside_a_trace(monkeypatch, tmp_path):
    """The real measurement, made while the model's step is traced: each candidate is
    compiled and timed then, not staged into the computation being traced."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(fast_conv, "MIN_MEASURED_MACS", 0)
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    hlo_of_auto(x, w)
    choices = json.loads(conv_choice.cache_path().read_text())
    assert {key.split()[0] for key in choices} == set(fast_conv.PARTS)
    for entry in choices.values():
        assert entry["choice"] in entry["ms"] and all(ms > 0 for ms in entry["ms"].values())


@pytest.mark.native
def test_native_results_do_not_depend_on_thread_timing(native_kernels):
    x = jax.random.normal(jax.random.key(0), (32, 16, 16, 16))
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
    pads = ((1, 1), (1, 1))
    parts = [jax.jit(fast_conv.formulation(part, "native", x.shape, w.shape, (1, 1), pads))
             for part in fast_conv.PARTS]
    g = jax.random.normal(jax.random.key(2), (32, 16, 16, 32))
    arguments = [(x, w), (g, w), (x, g)]
    first = [part(*args) for part, args in zip(parts, arguments, strict=True)]
    for _ in range(3):
        for part, args, result in zip(parts, arguments, first, strict=True):
            np.testing.assert_array_equal(part(*args), result)


def test_without_a_compiler_the_native_kernels_are_off_with_a_warning(monkeypatch, caplog, fake_timings):
    timings, measured = fake_timings
    timings.update(xla=2.0, space_to_depth=2.0, conv=2.0, shifted=3.0, native=1.0)
    monkeypatch.setenv("CXX", "no-such-compiler")
    # A lookup of its own: the process's registered kernels stay as they are for later tests.
    monkeypatch.setattr(native_conv, "library", functools.cache(native_conv.library.__wrapped__))
    assert not native_conv.available()
    assert "no C++ compiler 'no-such-compiler'" in caplog.text
    assert native_calls(fast_conv.conv_general_dilated_for("auto"), jnp.ones((2, 8, 8, 16)),
                        jnp.ones((3, 3, 16, 16))) == 0
    assert all("native" not in names for names in measured)


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


AVX2_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from resnet_jax.cpu import conv_choice, fast_conv, native_conv
assert native_conv.available()
pads, layout = ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")
for x_shape, w_shape in (((2, 9, 7, 16), (3, 3, 16, 16)), ((2, 8, 8, 32), (3, 3, 32, 64)),
                         ((3, 9, 9, 16), (3, 3, 16, 32))):
    for s in (1, 2):
        x, w = jax.random.normal(jax.random.key(0), x_shape), jax.random.normal(jax.random.key(1), w_shape)
        conv = lambda x, w: lax.conv_general_dilated(x, w, (s, s), pads, dimension_numbers=layout)
        out, vjp = jax.vjp(conv, x, w)
        g = jax.random.normal(jax.random.key(2), out.shape)
        for part, args, want in zip(fast_conv.PARTS, ((x, w), (g, w), (x, g)), (out, *vjp(g))):
            fn = fast_conv.formulation(part, "native", x.shape, w.shape, (s, s), pads)
            assert "resnet_jax_conv" in str(jax.make_jaxpr(fn)(*args)), part
            scale = float(jnp.abs(want).max())
            np.testing.assert_allclose(jax.jit(fn)(*args), want, rtol=0, atol=1e-5 * scale)
print("ok")
"""


@pytest.mark.native
@pytest.mark.skipif(platform.machine() != "x86_64" or b" avx2" not in native_conv.cpu_description(),
                    reason="the AVX2 build needs an x86-64 CPU with AVX2")
def test_the_avx2_build_computes_what_xla_does(native_kernels, tmp_path):
    """The kernels built for AVX2 (8-wide vectors, 16 registers) on whatever x86 CPU runs
    the tests, AVX-512 ones included, in a process of their own."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), **{native_conv.MARCH_VARIABLE: "x86-64-v3"})
    result = subprocess.run([sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
    assert len(list((tmp_path / "resnet_jax").glob("conv_cpu-*.so"))) == 1


def test_auto_is_xla_off_the_cpu(monkeypatch):
    assert fast_conv.conv_general_dilated_for("xla") is lax.conv_general_dilated
    assert fast_conv.conv_general_dilated_for("auto") is not lax.conv_general_dilated  # the tests run on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert fast_conv.conv_general_dilated_for("auto") is lax.conv_general_dilated


def test_cpu_paths_compile_with_ynnpack_for_reductions_only(monkeypatch):
    ynn_reductions_only = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    assert fast_conv.compiler_options("auto") == ynn_reductions_only  # the tests run on CPU
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
              for path in fast_conv.CONV_PATHS}
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


@pytest.mark.parametrize("fastest", ["native", "shifted", "space_to_depth", "xla"])
def test_a_resnet8_training_step_is_the_same_on_every_path(fake_timings, fastest):
    """Through the whole network (stem, stride-2 blocks, BN, option A), with "auto"
    choosing each formulation in turn where it applies. After one step SGD's momentum
    trace is the gradient (plus the same weight decay): compare it leaf by leaf."""
    timings, _ = fake_timings
    timings.update(xla=2.0, space_to_depth=3.0, conv=2.0, shifted=3.0, native=3.0)
    timings[fastest] = 1.0
    expected_state, expected_metrics = one_train_step("xla")
    for path in fast_conv.CONV_PATHS:
        state, metrics = one_train_step(path)
        close(metrics["loss"], expected_metrics["loss"])
        jax.tree_util.tree_map(close, state.opt_state, expected_state.opt_state)
        jax.tree_util.tree_map(close, state.params, expected_state.params)
