"""The CPU-only code is reached from the training side's config, on the CPU backend only:
the models alone load no native code, and the allocator is left alone on GPU/TPU hosts."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import pytest

from resnet_jax import backend
from resnet_jax.cpu import fast_conv

REPO_ROOT = Path(__file__).resolve().parents[1]

MODEL_ALONE = """
import resnet_jax as rj
model = rj.create_model("resnet8")
"""
MODEL_OF_A_TRAINING_CONFIG = """
from resnet_jax import config as config_lib
from resnet_jax.state import build_model
model = build_model(config_lib.cifar_recipe("resnet8"))
"""
# Layers this small run XLA's convolutions unmeasured; every layer is measured here, as a
# full-sized one would be.
EVERY_LAYER_MEASURED = """
from resnet_jax.cpu import fast_conv
fast_conv.MIN_MEASURED_MACS = 0
"""
INIT_AND_APPLY = """
import json, sys
import jax, jax.numpy as jnp
x = jnp.ones((2, 8, 8, 3))
variables = model.init(jax.random.key(0), x)
model.apply(variables, x)
jax.jit(model.apply)(variables, x)
print(json.dumps(sorted(name for name in sys.modules if name.startswith("resnet_jax.cpu"))))
"""


def run_recording_the_compiler(build: str, tmp_path: Path) -> tuple[list[str], list[str]]:
    """(the resnet_jax.cpu modules loaded, the compiler's invocations) when a subprocess on
    the CPU builds a ResNet-8 with `build` and runs init, apply and a jitted apply, with
    $CXX a script that records its calls and an empty build cache."""
    calls = tmp_path / "calls"
    compiler = tmp_path / "recording-c++"
    compiler.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    compiler.chmod(0o755)
    env = dict(os.environ, CXX=str(compiler), XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", build + INIT_AND_APPLY], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded, calls.read_text().splitlines() if calls.exists() else []


def test_a_model_alone_loads_no_cpu_code_and_compiles_nothing(tmp_path):
    assert run_recording_the_compiler(MODEL_ALONE, tmp_path) == ([], [])


def test_a_training_config_on_the_cpu_reaches_the_native_kernels(tmp_path):
    """The same harness sees the CPU code where it is used: what the test above rules out."""
    loaded, calls = run_recording_the_compiler(MODEL_OF_A_TRAINING_CONFIG + EVERY_LAYER_MEASURED, tmp_path)
    assert "resnet_jax.cpu.native_conv" in loaded
    assert calls and calls[0] == "--version"


def test_the_cpu_gets_the_configured_path_and_other_backends_plain_convolutions(monkeypatch):
    assert backend.conv_module("xla") is nn.Conv and backend.compiler_options("xla") == {}
    module = backend.conv_module("auto")  # the tests run on the CPU
    assert isinstance(module, functools.partial) and module.func is nn.Conv
    assert module.keywords == {"conv_general_dilated": fast_conv.conv_general_dilated_for("auto")}
    assert backend.compiler_options("auto") == fast_conv.compiler_options("auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for path in fast_conv.CONV_PATHS:
        assert backend.conv_module(path) is nn.Conv
        assert backend.compiler_options(path) == {}


@pytest.mark.parametrize(("platforms", "plugins", "expected"), [
    (None, [], True),
    ("", [], True),
    (None, ["jax_cuda12_plugin"], False),
    (None, ["libtpu"], False),
    ("cpu", ["jax_cuda12_plugin"], True),  # JAX_PLATFORMS=cpu: the plugin is not loaded
    ("cuda", [], False),
    ("tpu,cpu", [], False),  # the first listed platform is the default
    ("cpu,cuda", ["jax_cuda12_plugin"], True),
])
def test_the_cpu_backend_is_expected_from_the_platforms_and_plugins(platforms, plugins, expected):
    assert backend.cpu_backend_expected(platforms, plugins) is expected


DECIDE_THE_ALLOCATOR = """
import json
from resnet_jax import backend, cli
from resnet_jax.cpu import allocator
cli.prepare_process()
print(json.dumps({
    "plugins": backend.installed_accelerator_plugins(),
    "allocator_set": allocator.keep_freed_memory.cache_info().currsize == 1,
}))
"""


@pytest.mark.parametrize(("platforms", "allocator_set"), [("", False), ("cpu", True)])
def test_the_allocator_is_set_only_where_the_cpu_will_run_without_starting_jax(tmp_path, platforms,
                                                                               allocator_set):
    """With a (fake) GPU plugin installed, the commands' first step leaves the allocator
    alone unless JAX_PLATFORMS=cpu; either way without loading the plugin (it raises if
    loaded), which JAX does when it starts a backend."""
    plugin = tmp_path / "jax_plugins" / "fake_gpu"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("raise RuntimeError('the plugin was loaded')\n")
    env = dict(os.environ, JAX_PLATFORMS=platforms,
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", DECIDE_THE_ALLOCATOR], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    decided = json.loads(result.stdout.strip().splitlines()[-1])
    assert "jax_plugins.fake_gpu" in decided["plugins"]
    assert decided["allocator_set"] is allocator_set
