"""Facts about the compiled training step, gathered in a process of its own (8 host CPU
devices, `XLA_FLAGS=--xla_force_host_platform_device_count=8`, set before JAX starts) and
printed as one JSON line for tests/test_compiled_step.py to check.

    python -m tests.compiled_step_probe memory|stream|memory_per_device_bn|memory_paired_bn DATA_DIR [WORKDIR]

The step is built as `train_and_evaluate` builds it (`open_inputs`, `build_model`,
`init_state`), from a tiny bfloat16 config; then, given a WORKDIR, `train_and_evaluate`
itself runs 20 steps while every host read of a device array's value is counted.
"memory_per_device_bn" is "memory" with BN statistics per device (`bn_group_size` = the
2 examples of each device) rather than over the global batch; "memory_paired_bn" with BN
statistics over groups of 4 examples, each spanning 2 devices (as the pod recipe's groups
of 32 do on 256 devices at its batch of 4,096).
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import traceback
import types
from collections import Counter

import jax
import numpy as np

from resnet_jax import config as config_lib
from resnet_jax import train
from resnet_jax.parallel import data_parallel
from resnet_jax.state import build_model, init_state

NUM_STEPS, LOG_EVERY, EVAL_EVERY = 20, 5, 10
# The devices each BN statistics group spans, by kind of probe.
BN_GROUP_DEVICES = {"memory_per_device_bn": 1, "memory_paired_bn": 2}
# An HLO instruction: `%name = <shape> opcode(`; the shape may be a tuple `(...)`.
_HLO_OPCODE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?:\([^=]*?\)|\S+)\s+([a-z][a-z0-9\-]*)\(")
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')
# StableHLO: `stablehlo.convolution(...) ... : (tensor<AxBxbf16>, tensor<...>) -> ...`
_OPERAND_TYPES = re.compile(r":\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->")
# The forms an HLO collective's replica_groups take: a mesh and the axes reduced over
# (`mesh['axis_0'=4,'axis_1'=2] {'axis_1'}`), or sub-axes of them, as newer XLA writes
# (`mesh['data'=8] {'data':(4)2}`: of 'data', the sub-axis of size 2 after one of 4), an
# iota tile (`[4,2]<=[8]`, groups of the last size), or the groups listed (`{{0,1},{2,3}}`).
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")


def tiny_config(kind: str, data_dir: str):
    if kind.startswith("memory"):
        config = config_lib.cifar_recipe("resnet8", "fashion_mnist")
    else:
        config = config_lib.imagenet_recipe("resnet8", "image_folder")
        config.dataset.update(image_size=32, scale_range=(36, 48), eval_resize=36, num_workers=0,
                              lighting_std=0.1)
    config.dataset.data_dir = data_dir
    config.model.dtype = "bfloat16"
    config.batch_size = config.eval_batch_size = 16  # 2 examples per device
    config.num_train_steps = NUM_STEPS
    config.log_every_steps = LOG_EVERY
    config.eval_every_steps = config.checkpoint_every_steps = EVAL_EVERY
    config.tensorboard = False
    per_device = config.batch_size // jax.device_count()
    config.bn_group_size = BN_GROUP_DEVICES.get(kind, 0) * per_device  # 0: over the global batch
    return config


def element_type(tensor_type: str) -> str:
    return tensor_type[len("tensor<"):-1].split("x")[-1]


def operand_types(stablehlo: str, op: str) -> list[list[str]]:
    """The element types of the two operands of every `op` in a StableHLO module."""
    found = []
    for line in stablehlo.splitlines():
        if re.search(rf"stablehlo\.{op}\b", line):  # \b: "dot" is not "dot_general"
            match = _OPERAND_TYPES.search(line)
            types = [element_type(t) for t in match.groups()] if match else [f"unparsed: {line.strip()}"]
            found.append(types)
    return found


def replica_group_size(instruction: str) -> int | str:
    """How many devices each replica group of an HLO collective instruction holds."""
    if match := _MESH_GROUPS.search(instruction):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", match.group(1)))
        reduced = re.findall(r"'(\w+)'(?::\(\d+\)(\d+))?", match.group(2))  # (axis, sub-axis size or "")
        return math.prod(int(sub or sizes[axis]) for axis, sub in reduced)
    if match := _IOTA_GROUPS.search(instruction):
        return int(match.group(1).split(",")[-1])
    if match := _LISTED_GROUPS.search(instruction):
        return len(match.group(1).split(","))
    return f"unparsed: {instruction.strip()[:200]}"


def hlo_facts(hlo: str) -> dict:
    """Opcode counts, custom-call targets, the operands and replica group size of each
    all-reduce, and the parameters aliased to outputs (donation) of a compiled HLO module."""
    opcodes = Counter()
    all_reduce_operands, all_reduce_group_sizes = [], []
    for line in hlo.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line)  # tuple shapes carry /*index=5*/ comments
        match = _HLO_OPCODE.match(line)
        if not match:
            continue
        opcodes[match.group(1)] += 1
        if match.group(1) in ("all-reduce", "all-reduce-start"):
            inside = line[match.end():line.index(")", match.end())]
            all_reduce_operands.append(len([o for o in inside.split(",") if o.strip()]))
            all_reduce_group_sizes.append(replica_group_size(line))
    header = next(line for line in hlo.splitlines() if line.startswith("HloModule"))
    aliased = sorted({int(p) for p in re.findall(r"\(\s*(\d+),\s*\{[^}]*\},\s*(?:may|must)-alias\)", header)})
    return dict(opcodes=dict(opcodes), custom_call_targets=sorted(set(_CUSTOM_CALL_TARGET.findall(hlo))),
                all_reduce_operands=all_reduce_operands, all_reduce_group_sizes=all_reduce_group_sizes,
                aliased_parameters=aliased)


def step_facts(config) -> dict:
    parallel = data_parallel()
    inputs = train.open_inputs(config, parallel, ("train", "eval"))
    config = train.with_dataset_classes(config, inputs.num_classes)
    model = build_model(config)
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    state = jax.jit(lambda k: init_state(config, model, k), out_shardings=parallel.replicated)(init_key)
    step = inputs.train_step(model)
    with inputs.train_batches(0) as batches:
        step_inputs = next(batches)
        lowered = step.lower(state, inputs=step_inputs, key=data_key)
        facts = hlo_facts(lowered.compile().as_text())
        stablehlo = lowered.as_text()
        old_leaves = jax.tree_util.tree_leaves(state)
        state, metrics = step(state, inputs=step_inputs, key=data_key)
    facts.update(
        num_state_leaves=len(old_leaves),
        deleted_state_leaves=sum(leaf.is_deleted() for leaf in old_leaves),
        convolution_operands=operand_types(stablehlo, "convolution"),
        dot_operands=operand_types(stablehlo, "dot_general") + operand_types(stablehlo, "dot"),
        param_dtypes=sorted({str(p.dtype) for p in jax.tree_util.tree_leaves(state.params)}),
        opt_state_float_dtypes=sorted({
            str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(state.opt_state)
            if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
        }),
        batch_stats_dtypes=sorted({str(s.dtype) for s in jax.tree_util.tree_leaves(state.batch_stats)}),
        loss_dtype=str(metrics["loss"].dtype),
        num_devices=jax.device_count(),
    )
    return facts


def guarded_training(config, workdir: str) -> dict:
    """Runs `train_and_evaluate`, recording after which steps the training thread read a
    device array's value on the host (`jax.Array._value`, what `device_get`, `float()`,
    `.item()` and `np.asarray` go through; with the first reading line) and after which
    it waited with `jax.block_until_ready`.
    (`jax.transfer_guard` cannot do this on CPU: its device memory is host memory, so
    reading it is no transfer there.)"""
    record = {"dispatched_steps": 0, "waits_after_step": [], "reads_after_step": {}, "error": None}
    array_type = type(jax.numpy.zeros(()))
    read_value, open_inputs, block_until_ready = array_type._value, train.open_inputs, jax.block_until_ready

    def counted_read(array):
        step = record["dispatched_steps"]
        if step and threading.current_thread() is threading.main_thread():
            caller = traceback.extract_stack(limit=3)[0]
            record["reads_after_step"].setdefault(step, f"{caller.filename}:{caller.lineno}")
        return read_value.fget(array)

    def open_counted_inputs(*args, **kwargs):
        inputs = open_inputs(*args, **kwargs)
        make_step = inputs.train_step
        inputs.train_step = lambda model: CountedStep(make_step(model))
        return inputs

    class CountedStep:
        """The training step, jitted or compiled ahead (`train.compile_ahead` lowers and
        compiles it), each call counted as `steps_per_dispatch` steps dispatched."""

        def __init__(self, step):
            self.step = step

        def __call__(self, *args, **kwargs):
            out = self.step(*args, **kwargs)
            record["dispatched_steps"] += config.steps_per_dispatch
            return out

        def lower(self, *args, **kwargs):
            lowered = self.step.lower(*args, **kwargs)
            return types.SimpleNamespace(compile=lambda: CountedStep(lowered.compile()))

    def recorded_wait(x):
        # The training thread's waits: the input pipeline's transfer thread waits for each
        # batch's transfer (`stream.DeviceBatches`), which holds up no step.
        if threading.current_thread() is threading.main_thread():
            record["waits_after_step"].append(record["dispatched_steps"])
        return block_until_ready(x)

    array_type._value = property(counted_read)
    train.open_inputs, jax.block_until_ready = open_counted_inputs, recorded_wait
    try:
        result = train.train_and_evaluate(config, workdir)
        record["final_eval_error"] = result["eval_error"]
    except Exception as error:  # noqa: BLE001 (reported, with the step it happened after)
        record["error"] = f"after step {record['dispatched_steps']}: {type(error).__name__}: {error}"
    finally:
        array_type._value = read_value
        train.open_inputs, jax.block_until_ready = open_inputs, block_until_ready
    return record


def main(kind: str, data_dir: str, workdir: str | None = None) -> None:
    config = tiny_config(kind, data_dir)
    facts = step_facts(config)
    if workdir:
        facts["training"] = guarded_training(config, workdir)
    print(json.dumps(facts, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


if __name__ == "__main__":
    main(*sys.argv[1:])
