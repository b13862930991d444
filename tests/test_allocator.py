"""allocator.keep_freed_memory: XLA:CPU's per-execution scratch memory is reused, not
faulted in anew on every call (what that is worth: benchmarks/RESULTS.md)."""

import json
import statistics
import subprocess
import sys

import pytest

# Counts the page faults of each of 16 calls of a jitted ResNet-8 gradient (batch 64),
# whose scratch memory (tens of MB) glibc would otherwise map and unmap on every call.
SCRIPT = """
import json, resource, sys
from resnet_jax.cpu import allocator
kept = sys.argv[1] == "keep" and allocator.keep_freed_memory()
import jax, jax.numpy as jnp
import resnet_jax as rj
model = rj.create_model("resnet8")
x = jnp.ones((64, 32, 32, 3))
variables = model.init(jax.random.key(0), x)
def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(logits ** 2)
grad = jax.jit(jax.grad(loss))
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(grad(variables["params"]))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def page_faults_per_call(mode: str) -> tuple[bool, list[int]]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["kept"], result["faults"][1:]  # the first call allocates whatever is done


def test_scratch_memory_is_reused_across_calls():
    kept, faults = page_faults_per_call("keep")
    if not kept:
        pytest.skip("not glibc: keep_freed_memory does nothing here")
    _, faults_by_default = page_faults_per_call("default")
    assert min(faults_by_default) > 5000  # the cost being removed: every call faults its scratch in
    assert statistics.median(faults) < 100, faults  # occasionally a call still grows the heap
