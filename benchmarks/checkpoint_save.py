"""How long a checkpoint save blocks the training thread, for a ResNet-50-sized state.

    python benchmarks/checkpoint_save.py [--model=resnet50] [--saves=5]

The state is a `TrainState` of the paper's ImageNet recipe for the model (parameters, BN
statistics, SGD momentum), initialised on the devices as training does. Each way saves
into its own temporary workdir (keeping one checkpoint, Orbax deleting the older ones);
each save is timed from the call to its return, which is when training would dispatch
its next step: the median over `--saves` saves after the first. Three ways:
- `device_checksums`: `checkpoint.save`, which dispatches `integrity`'s checksums and
  writes them from a background thread;
- `host_sha256`: the other design, how saves ran before `integrity`: SHA-256 of every
  array (`sha256_digests`, a fetch of the whole state to the host) on the training
  thread, then Orbax's save with the digests in its metadata;
- `orbax_alone`: Orbax's save with no checksums at all, what the other two add to.
`written_s` is the median time from a save's call until it and its checksums are on
disk (`wait_until_finished`), which training does not wait for; `first_blocking_ms` the
first save's blocking time (it also compiles the checksum programs, where the compilation
cache does not hold them).

Printed last, one JSON line: `state_bytes`, per way `first_blocking_ms`, `blocking_ms`
and `written_s`, the arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import absl.logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from resnet_jax import backend, checkpoint
from resnet_jax import config as config_lib
from resnet_jax.parallel import data_parallel
from resnet_jax.state import build_model, init_state


def sha256_digests(state) -> dict[str, str]:
    """SHA-256 of every array of a (host or fully addressable) state, by tree path."""
    digests = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]:
        array = np.ascontiguousarray(leaf)
        header = f"{array.dtype.str}{array.shape}".encode()
        digests[jax.tree_util.keystr(path)] = hashlib.sha256(header + array.tobytes()).hexdigest()
    return digests


def save_host_sha256(mngr: checkpoint.Manager, step: int, state) -> None:
    mngr.save(step, args=ocp.args.StandardSave(state), force=True,
              custom_metadata={"sha256": sha256_digests(state)})


def save_without_checksums(mngr: checkpoint.Manager, step: int, state) -> None:
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)


SAVES = {"device_checksums": checkpoint.save, "host_sha256": save_host_sha256,
         "orbax_alone": save_without_checksums}


def time_saves(save, state, saves: int) -> dict:
    blocking, written = [], []
    with tempfile.TemporaryDirectory() as folder, checkpoint.manager(Path(folder), keep=1) as mngr:
        for _ in range(saves + 1):
            start = time.perf_counter()
            save(mngr, len(blocking), state)
            blocking.append(time.perf_counter() - start)
            mngr.wait_until_finished()
            written.append(time.perf_counter() - start)
    # The first save of a process also compiles the checksums and creates the folders.
    return {"first_blocking_ms": round(blocking[0] * 1e3, 1),
            "blocking_ms": round(statistics.median(blocking[1:]) * 1e3, 1),
            "written_s": round(statistics.median(written[1:]), 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="any ImageNet-family name of resnet_jax.list_models()")
    p.add_argument("--saves", type=int, default=5, help="timed saves of each way")
    args = p.parse_args(argv)
    backend.keep_freed_memory_on_cpu()  # as train.py does, before JAX starts its threads
    absl.logging.set_verbosity(absl.logging.ERROR)  # Orbax's routine notes

    parallel = data_parallel()
    config = config_lib.imagenet_recipe(args.model)
    model = build_model(config)
    state = jax.jit(lambda key: init_state(config, model, key), out_shardings=parallel.replicated)(
        jax.random.key(0))
    state_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state))
    results = {way: time_saves(save, state, args.saves) for way, save in SAVES.items()}
    print(json.dumps({"state_bytes": state_bytes, **results, "device": jax.devices()[0].device_kind,
                      "num_devices": parallel.num_devices, **vars(args)}), flush=True)


if __name__ == "__main__":
    main()
