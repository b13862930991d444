"""The persistent compilation cache: a second process loads what the first compiled, the
native convolutions' custom calls included, and a run resumed from the cache trains alike.

Each run is its own process, as a user's are: JAX reads the cache setting at a process's
first compilation, and counts the cache's hits and misses in `jax.monitoring` events.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint, compile_cache
from resnet_jax.state import abstract_train_state, build_model
from tests.fake_data import write_graded_fashion_mnist

REPO_ROOT = Path(__file__).resolve().parents[1]
# What each child process prints last: the cache's hits and misses (entries written) it
# counted, and the programs that were hits, by name (from JAX's compiler log).
COUNT_EVENTS = """
import collections, json, logging, jax
counts, hit_programs = collections.Counter(), []
jax.monitoring.register_event_listener(lambda event, **_: counts.update([event]))
class HitLog(logging.Handler):
    def emit(self, record):
        if record.msg.startswith("Persistent compilation cache hit"):
            hit_programs.append(record.args[0])
compiler_log = logging.getLogger("jax._src.compiler")
compiler_log.setLevel(logging.DEBUG)
compiler_log.addHandler(HitLog())
def report(**extra):
    print(json.dumps({"hits": counts["/jax/compilation_cache/cache_hits"],
                      "misses": counts["/jax/compilation_cache/cache_misses"],
                      "hit_programs": hit_programs, **extra}))
"""
TRAIN = COUNT_EVENTS + """
import sys
from tests.test_train import tiny_config
from resnet_jax.train import train_and_evaluate
result = train_and_evaluate(tiny_config(sys.argv[1], compilation_cache_dir=sys.argv[3]), sys.argv[2])
report(result=result)
"""
NATIVE_CONV = COUNT_EVENTS + """
import sys
import numpy as np
from jax import lax
from resnet_jax import compile_cache
from resnet_jax.cpu import native_conv
compile_cache.enable(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this small program too
x = np.random.default_rng(0).standard_normal((2, 12, 12, 16), np.float32)
kernel = np.random.default_rng(1).standard_normal((3, 3, 16, 32), np.float32)
pads = ((1, 1), (1, 1))
assert native_conv.supported(x, kernel.shape, pads)  # registers the custom-call targets, as tracing does
conv = jax.jit(lambda x, kernel: native_conv.forward(x, kernel, (1, 1), pads))
hlo = conv.lower(x, kernel).as_text()
expected = lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
report(custom_call="resnet_jax_conv_forward" in hlo,
       max_difference=float(np.abs(np.asarray(conv(x, kernel)) - np.asarray(expected)).max()))
"""


def run_child(script, *args):
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO_ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_the_setting_names_a_user_cache_a_directory_or_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.directory("auto") == tmp_path / "resnet_jax" / "xla"
    assert compile_cache.directory("") is None
    assert compile_cache.directory(str(tmp_path / "mine")) == tmp_path / "mine"
    assert compile_cache.directory("~/x") == Path.home() / "x"


def final_state(workdir):
    config = checkpoint.read_config(workdir)
    with checkpoint.manager(workdir, read_only=True) as mngr:
        abstract_state = abstract_train_state(config, build_model(config))
        return checkpoint.restore(mngr, max(mngr.all_steps()), abstract_state)


def test_a_second_process_loads_the_steps_from_the_cache_and_a_resumed_run_trains_alike(tmp_path):
    (tmp_path / "data").mkdir()
    data_dir = write_graded_fashion_mnist(tmp_path / "data", 0, 512, 100, gz=True)
    cache, workdir = tmp_path / "xla", tmp_path / "run"

    cold = run_child(TRAIN, data_dir, workdir, cache)
    entries = sorted(p.name for p in cache.iterdir())
    assert cold["hits"] == 0 and cold["misses"] == len(entries)
    assert any(name.startswith("jit_step-") for name in entries)  # the training step
    assert any(name.startswith("jit_eval_step-") for name in entries)
    uninterrupted = final_state(workdir)

    shutil.rmtree(workdir / checkpoint.CHECKPOINT_DIR / "24")  # resume from step 12
    warm = run_child(TRAIN, data_dir, workdir, cache)
    # Which small programs take over the threshold to compile depends on the machine's
    # load; the steps always do, and come from the cache.
    assert {"jit_step", "jit_eval_step"} <= set(warm["hit_programs"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, final_state(workdir), uninterrupted)
    assert warm["result"] == cold["result"]


@pytest.mark.native
def test_a_program_calling_the_native_kernels_runs_from_the_cache(tmp_path):
    cold = run_child(NATIVE_CONV, tmp_path)
    warm = run_child(NATIVE_CONV, tmp_path)
    assert cold["custom_call"] and cold["hits"] == 0 and cold["misses"] == len(list(tmp_path.iterdir()))
    assert warm["hits"] == cold["misses"] and warm["misses"] == 0
    assert warm["max_difference"] == cold["max_difference"] < 1e-4
