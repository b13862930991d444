"""Properties of the compiled training step on 8 host CPU devices, for the step of data
held on the devices and the step of streamed data (`make_train_step`,
`make_stream_train_step`): donation, no host round trips, bfloat16 compute with float32
state, a budget of all-reduces, and host syncs only where training logs or evaluates.

The facts are gathered by `tests/compiled_step_probe.py` in a process of its own: this
one already started JAX with one device.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.compiled_step_probe import EVAL_EVERY, LOG_EVERY, NUM_STEPS
from tests.fake_data import write_graded_fashion_mnist, write_image_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
# HLO opcodes that move data between host and device or between programs mid-step.
HOST_ROUND_TRIPS = ("infeed", "outfeed", "send", "send-done", "recv", "recv-done", "host-compute")
OTHER_COLLECTIVES = ("all-gather", "all-gather-start", "reduce-scatter", "all-to-all", "collective-permute",
                     "collective-permute-start", "collective-broadcast")
# The compiled step's all-reduces, ResNet-8 (7 BN layers, 23 parameter arrays) with BN over
# the global batch, 8 devices, as measured with jax 0.10.2: 30 all-reduces of 53 arrays:
# 14 of the forward BN statistics (each layer's mean and mean square over the devices'
# batch), 14 of the backward BN sums (21 arrays; they yield 8 of the 14 BN scale and
# offset gradients as well), 1 of the training-error count, 1 that XLA combined from the
# other 15 parameter gradients and the loss. A change that adds a collective exceeds it.
ALL_REDUCE_BUDGET = {"all_reduces": 30, "arrays": 53}
# The same with BN statistics per device (bn_group_size = each device's 2 examples, the pod
# recipe's case wherever its 32 divide a device's share): the BN layers' 28 all-reduces are
# gone; left are the training-error count and one combined of the 23 gradients, the loss and
# the 14 running statistics averaged over the groups. (The groups once ran the whole net
# under `vmap`: 2 all-reduces as well, but 14 all-gathers of the CPU convolutions' weight
# gradients came with them; `models.BatchNorm` now groups inside each BN layer.)
PER_DEVICE_BN_ALL_REDUCE_BUDGET = {"all_reduces": 2, "arrays": 39}
# With groups of 4 examples, each spanning 2 devices (the pod recipe's groups of 32 at 16
# examples per device, 256 devices at its batch of 4,096): the 28 BN all-reduces stay, each
# among its group's 2 devices; among more devices: the one combined of the gradients and
# the loss, the training-error count, and the running statistics averaged over the groups.
PAIRED_BN_GROUP_DEVICES, PAIRED_BN_WIDE_ALL_REDUCES = 2, 3


def probe(*args: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-m", "tests.compiled_step_probe", *args], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["num_devices"] == 8
    return found


def fashion_mnist(folder: Path) -> Path:
    return write_graded_fashion_mnist(folder, 0, 64, 40, gz=True)


def counted_all_reduces(facts: dict) -> dict:
    return {"all_reduces": len(facts["all_reduce_operands"]), "arrays": sum(facts["all_reduce_operands"])}


@pytest.fixture(scope="module", params=["memory", pytest.param("stream", marks=pytest.mark.grain)])
def facts(request, tmp_path_factory):
    kind = request.param
    data = tmp_path_factory.mktemp(f"{kind}_data")
    if kind == "memory":
        fashion_mnist(data)
    else:
        pytest.importorskip("grain")
        pytest.importorskip("PIL")
        write_image_folder(data, 0)
    return probe(kind, str(data), str(tmp_path_factory.mktemp("run")))


def test_every_leaf_of_the_train_state_is_donated(facts):
    # Aliased in the compiled program (the state's leaves are its first parameters) ...
    assert facts["aliased_parameters"] == list(range(facts["num_state_leaves"]))
    # ... and freed when the step runs.
    assert facts["deleted_state_leaves"] == facts["num_state_leaves"]


def test_no_host_callbacks_infeed_outfeed_or_send_recv(facts):
    assert not set(facts["opcodes"]) & set(HOST_ROUND_TRIPS), facts["opcodes"]
    targets = facts["custom_call_targets"]
    assert not [target for target in targets if "callback" in target.lower()], targets


def test_bfloat16_compute_float32_state_and_loss(facts):
    convolutions = Counter(map(tuple, facts["convolution_operands"]))
    assert convolutions.total() >= 7 * 2  # forward and gradients of ResNet-8's 7 convolutions
    assert convolutions == {("bf16", "bf16"): convolutions.total()}
    assert facts["dot_operands"] and all(types == ["bf16", "bf16"] for types in facts["dot_operands"])
    assert facts["param_dtypes"] == ["float32"]
    assert facts["opt_state_float_dtypes"] == ["float32"]
    assert facts["batch_stats_dtypes"] == ["float32"]
    assert facts["loss_dtype"] == "float32"


def test_all_reduces_are_held_to_their_budget(facts):
    assert not set(facts["opcodes"]) & set(OTHER_COLLECTIVES), facts["opcodes"]
    counted = counted_all_reduces(facts)
    assert counted["all_reduces"] >= 2  # the gradients' and the forward BN statistics': the count is live
    assert all(counted[key] <= ALL_REDUCE_BUDGET[key] for key in counted), (counted, ALL_REDUCE_BUDGET)


def test_batch_norm_per_device_needs_no_all_reduce_of_its_own(tmp_path):
    facts = probe("memory_per_device_bn", str(fashion_mnist(tmp_path)))
    assert not set(facts["opcodes"]) & set(OTHER_COLLECTIVES), facts["opcodes"]
    counted = counted_all_reduces(facts)
    budget = PER_DEVICE_BN_ALL_REDUCE_BUDGET
    assert counted["all_reduces"] >= 1  # the gradients': the count is live
    assert all(counted[key] <= budget[key] for key in counted), (counted, budget)


def test_batch_norm_groups_across_devices_reduce_only_among_their_devices(tmp_path):
    facts = probe("memory_paired_bn", str(fashion_mnist(tmp_path)))
    assert not set(facts["opcodes"]) & set(OTHER_COLLECTIVES), facts["opcodes"]
    sizes = Counter(facts["all_reduce_group_sizes"])
    assert all(isinstance(size, int) for size in sizes), sizes
    wide = sum(count for size, count in sizes.items() if size > PAIRED_BN_GROUP_DEVICES)
    assert sizes[PAIRED_BN_GROUP_DEVICES] >= 7  # at least one per BN layer: the count is live
    assert wide <= PAIRED_BN_WIDE_ALL_REDUCES, sizes


def test_host_waits_on_the_device_only_at_log_and_eval_steps(facts):
    training = facts["training"]
    assert training["error"] is None and training["dispatched_steps"] == NUM_STEPS
    # Device values were read on the host after the first step (its console line) and the
    # log steps (evaluation and checkpoints come at every other one), after no other step ...
    log_steps = list(range(LOG_EVERY, NUM_STEPS + 1, LOG_EVERY))
    assert EVAL_EVERY % LOG_EVERY == 0 and len(log_steps) < NUM_STEPS and LOG_EVERY > 1
    assert sorted(map(int, training["reads_after_step"])) == [1, *log_steps], training["reads_after_step"]
    # ... and the one explicit wait is after the first dispatch, which keeps compilation
    # out of the first logged images/s.
    assert training["waits_after_step"] == [1]
