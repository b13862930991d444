"""Training throughput of the project's own training step, on synthetic device-resident data.

    python benchmarks/train_throughput.py --model=resnet20 --batch_size=128 --steps=10 \
        [--dtype=float32|bfloat16] [--image_size=32] [--steps_per_dispatch=1] [--conv=auto|xla] \
        [--keep_freed_memory=true|false] [--compilation_cache_dir=DIR]

What is timed is `resnet_jax.train.make_train_step`, the step `train.py` runs: gather a
batch from a split held on the devices, normalise, pad-crop-flip, forward, backward, SGD
with momentum. Only the data are synthetic: `num_examples` random uint8 images of
`image_size` x `image_size` x 3 with random labels, put on the devices as training puts
CIFAR there. The config is the paper's CIFAR recipe (`cifar_recipe`) for the model; an
ImageNet-family model keeps its 1000-class head (its parameters are built from a 32x32
input, which a convolutional net's parameter shapes do not depend on). `--conv` is the
config's `model.conv` (the convolution path on the CPU backend; ignored elsewhere). As in
`train.py`, on the CPU the host allocator keeps freed memory (`resnet_jax.cpu.allocator`)
unless `--keep_freed_memory=false`, which measures what that is worth.
`--compilation_cache_dir` is the config key of that name (default "": off, so that
`compile_s` is a compilation; `benchmarks/startup.py` times start-up with it on).

Printed last, one JSON line:
- `compile_s`: tracing and XLA compilation of the step, no execution;
- `step_ms`: the median over the timed dispatches of (dispatch time / steps_per_dispatch),
  each dispatch waited for, after one untimed warm-up dispatch; the median because other
  work on a shared machine shows up as outliers; `images_per_sec` = batch_size / step_ms;
- `macs_per_image`: multiply-adds of one forward pass (`resnet_jax.count_macs`, the
  paper's FLOPs column);
- `achieved_flops_per_sec` = 6 x macs_per_image x images_per_sec: a training step counted
  as three forward passes (forward, gradient wrt inputs, gradient wrt weights), 2 FLOPs
  per multiply-add; BN, ReLU, the optimizer and the data path are not counted;
- `peak_memory_bytes`: the first device's `memory_stats()["peak_bytes_in_use"]` where the
  backend reports it (GPU, TPU), else null (CPU);
- `device`, `jax_version`, `num_devices` and the arguments.

`benchmarks/torch_resnet20.py` times the same CIFAR ResNet-20 step in PyTorch and
`benchmarks/compare_cpu.py` runs both and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from resnet_jax import backend, compile_cache
from resnet_jax import config as config_lib
from resnet_jax.complexity import count_macs
from resnet_jax.data import memory
from resnet_jax.data.augment import normalization_stats
from resnet_jax.data.sources import Split
from resnet_jax.models import model_spec
from resnet_jax.parallel import data_parallel
from resnet_jax.state import build_model, init_state
from resnet_jax.train import make_train_step

CHANNELS = 3
# A training step counts as forward + gradient wrt inputs + gradient wrt weights, each
# as costly as the forward pass, at 2 FLOPs per multiply-add.
FLOPS_PER_MAC_TRAINING = 3 * 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="any name of resnet_jax.list_models()")
    p.add_argument("--batch_size", type=int, default=128, help="global batch")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--dtype", default="float32", choices=config_lib.DTYPES, help="computation dtype")
    p.add_argument("--image_size", type=int, default=32, help="height and width of the synthetic images")
    p.add_argument("--steps_per_dispatch", type=int, default=1, help="training steps per compiled call")
    p.add_argument("--conv", default="auto", choices=backend.CONV_PATHS,
                   help="the config's model.conv: the convolution path on the CPU")
    p.add_argument("--num_examples", type=int, default=0,
                   help="examples held on the devices; 0: 10 x batch_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep_freed_memory", default="true", choices=("true", "false"),
                   help="on the CPU, resnet_jax.cpu.allocator.keep_freed_memory() first, as train.py does")
    p.add_argument("--compilation_cache_dir", default="",
                   help="the config key: JAX's persistent compilation cache (default '': off)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.steps % args.steps_per_dispatch:
        p.error(f"--steps={args.steps} must be a positive multiple of --steps_per_dispatch")
    return args


def synthetic_split(num_examples: int, image_size: int, num_classes: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_examples, image_size, image_size, CHANNELS), dtype=np.uint8)
    labels = rng.integers(0, num_classes, num_examples, dtype=np.int32)
    return Split(images, labels, num_classes)


def measure(args: argparse.Namespace) -> dict:
    parallel = data_parallel()
    config = config_lib.cifar_recipe(args.model)
    config.batch_size = args.batch_size
    config.steps_per_dispatch = args.steps_per_dispatch
    config.model.dtype = args.dtype
    config.model.conv = args.conv
    config_lib.validate(config, parallel.num_devices)
    model = build_model(config).clone(num_classes=model_spec(args.model)["num_classes"])

    split = synthetic_split(args.num_examples or 10 * args.batch_size, args.image_size, model.num_classes,
                            args.seed)
    memory.check_batch_fits(split, args.batch_size, "synthetic")
    mean, std = normalization_stats(split.images, config.dataset.normalization)
    data = memory.put_on_devices(split, mean, std, parallel.replicated)
    init_key, data_key = jax.random.split(jax.random.key(args.seed))
    state = jax.jit(lambda k: init_state(config, model, k), out_shardings=parallel.replicated)(init_key)

    start = time.perf_counter()
    train_step = make_train_step(config, model, parallel).lower(state, data, data_key).compile()
    compile_s = time.perf_counter() - start
    state, metrics = train_step(state, data, data_key)  # warm-up: first-touch allocations
    jax.block_until_ready(metrics)
    step_times = []
    for _ in range(args.steps // args.steps_per_dispatch):
        start = time.perf_counter()
        state, metrics = train_step(state, data, data_key)
        jax.block_until_ready(metrics)
        step_times.append((time.perf_counter() - start) / args.steps_per_dispatch)
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"the training loss is {float(metrics['loss'])}: the timed step is broken")

    step_s = statistics.median(step_times)
    images_per_sec = args.batch_size / step_s
    macs = count_macs(model, (1, args.image_size, args.image_size, CHANNELS))
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        images_per_sec=images_per_sec,
        step_ms=step_s * 1e3,
        compile_s=compile_s,
        peak_memory_bytes=stats.get("peak_bytes_in_use"),
        macs_per_image=macs,
        achieved_flops_per_sec=FLOPS_PER_MAC_TRAINING * macs * images_per_sec,
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        num_devices=parallel.num_devices,
        jax_version=jax.__version__,
        **vars(args),
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.keep_freed_memory == "true":
        backend.keep_freed_memory_on_cpu()  # as train.py does, before JAX starts its threads
    compile_cache.enable(args.compilation_cache_dir)
    print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
