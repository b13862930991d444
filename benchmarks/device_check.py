"""The accelerator figures in one command: ResNet-50 and ResNet-20 training speed, and the
paper's CIFAR schedule timed end to end, within a time budget, downloading nothing.

    python benchmarks/device_check.py --out DIR [--smoke] [--budget_s 420] \
        [--fashion_mnist_dir /usr/share/datasets/fashion-mnist] [--workers K] [--loaders grain,dali] ...

Writes DIR/device_check.json and DIR/device_check.md (one table) and prints both. Every
phase runs the project's own compiled training step (`resnet_jax.train`), the one
`train.py` runs, and records its own seconds:
- `environment`: device kind and count, driver (`nvidia-smi`, where there is one), the
  backend's platform version, jax/jaxlib/flax/optax versions, the CPU;
- `imagenet`: the streamed-data step of the ImageNet recipe in bfloat16 (float32
  parameters and optimizer state), `--batch_per_device` images per device, at
  `--image_size`; compile seconds; images/s (a) with one batch already on the devices,
  (b) with the batch copied from host memory at every step, (c) fed by each of
  `--loaders` (`dataset.loader`, opened as `train.py` opens its data) from a generated
  folder of `--stream_images` JPEGs of ImageNet's typical size: "grain", the host
  pipeline (`resnet_jax/data/stream.py`) with `--workers` decoding processes, and "dali",
  NVIDIA DALI decoding on the GPU ("mixed": nvJPEG; on the CPU where there is no GPU) with
  `--workers` CPU threads; for each, the reason where it was skipped (its packages
  absent) or could not start; peak device memory (`memory_stats()`, where the backend
  reports it); MFU = 6 x forward multiply-adds (`resnet_jax.count_macs`) x images/s
  over the devices' published dense bf16 peak (`PEAK_BF16_FLOPS`), null with the reason
  for a device not in that table;
- `cifar`: the paper's CIFAR recipe on Fashion-MNIST held on the devices (read from
  `--fashion_mnist_dir`): images/s for each of `--cifar_steps_per_dispatch`, and the
  projected time of the `--schedule_steps` schedule (the paper's 64k iterations) at the
  fastest; then, if the budget has room for it, that schedule itself through
  `train_and_evaluate` (evaluation every 2,000 steps, checkpoints into a temporary
  folder) with its wall time and test error, or the reason it was not run.
Throughput is timed over `--steps` dispatches back to back after `--warmup_steps`, waiting
for the device once at the end, as training waits only at its log steps.

`--smoke` runs the same code at tiny sizes (a ResNet-8, 32x32 images, a few steps, one
Grain worker, one DALI thread) so that CI proves the script on a CPU, both loaders where
DALI is installed; any flag given explicitly overrides the mode's value. The prepared
accelerator command is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from resnet_jax import backend, train
from resnet_jax import config as config_lib
from resnet_jax.complexity import count_macs
from resnet_jax.data import augment
from resnet_jax.data.sources import DataError
from resnet_jax.data.stream import Normalization, StreamedBatch
from resnet_jax.parallel import Parallel, data_parallel
from resnet_jax.state import build_model, init_state

sys.path.insert(0, str(Path(__file__).resolve().parent))
from input_pipeline import write_jpegs  # noqa: E402  (the pipeline benchmark's JPEG folder)

# A training step counts as forward + gradient wrt inputs + gradient wrt weights, each as
# costly as the forward pass, at 2 FLOPs per multiply-add (as train_throughput.py).
FLOPS_PER_MAC_TRAINING = 3 * 2
# Published dense (no sparsity) bf16 matrix peaks per device, FLOP/s, from the vendors'
# datasheets; the first entry whose text is in `device_kind` applies, so the more specific
# names come first.
PEAK_BF16_FLOPS = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("L40S", 362e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),
)
# Per mode, every size flag's value where the command line gives none.
SIZES = {
    "full": dict(
        budget_s=420, imagenet_model="resnet50", batch_per_device=256, image_size=224, steps=30,
        warmup_steps=3, workers=max(1, (os.cpu_count() or 2) - 1), stream_images=512,
        jpeg_shape=(375, 500), cifar_model="resnet20", cifar_batch_size=128, cifar_steps=300,
        cifar_steps_per_dispatch="1,100", schedule_steps=config_lib.PAPER_CIFAR_STEPS,
    ),
    # A budget no loaded CI machine exceeds: the smoke run must take every path, the schedule too.
    "smoke": dict(
        budget_s=600, imagenet_model="resnet8", batch_per_device=4, image_size=32, steps=2,
        warmup_steps=1, workers=1, stream_images=8, jpeg_shape=(40, 48), cifar_model="resnet8",
        cifar_batch_size=16, cifar_steps=2, cifar_steps_per_dispatch="1,2", schedule_steps=4,
    ),
}
JSON_NAME, TABLE_NAME = "device_check.json", "device_check.md"
LOADER_NAMES = {"grain": "Grain", "dali": "DALI"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for device_check.json and device_check.md")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, same code: proves the script on a CPU")
    p.add_argument("--fashion_mnist_dir", default=config_lib.FASHION_MNIST_DEBIAN_DIR,
                   help="Fashion-MNIST's four IDX files (.gz or not)")
    p.add_argument("--budget_s", type=float, help="seconds the whole check may take; the CIFAR schedule "
                   "runs only if its projected time fits in what is left")
    p.add_argument("--imagenet_model", help="the ImageNet-phase network (resnet_jax.list_models())")
    p.add_argument("--batch_per_device", type=int, help="ImageNet-phase images per device per step")
    p.add_argument("--image_size", type=int, help="ImageNet-phase crop side")
    p.add_argument("--steps", type=int, help="timed ImageNet-phase steps per measurement")
    p.add_argument("--warmup_steps", type=int, help="untimed steps before each measurement")
    p.add_argument("--workers", type=int, help="Grain decoding processes, and DALI CPU threads, of the "
                   "loaders' measurements")
    p.add_argument("--loaders", default=",".join(config_lib.LOADERS),
                   help=f"comma-separated loaders to time ({', '.join(config_lib.LOADERS)})")
    p.add_argument("--stream_images", type=int, help="JPEGs in the generated image folder")
    p.add_argument("--jpeg_shape", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                   help="size of the generated JPEGs")
    p.add_argument("--cifar_model", help="the CIFAR-phase network")
    p.add_argument("--cifar_batch_size", type=int, help="CIFAR-phase global batch (the paper's: 128)")
    p.add_argument("--cifar_steps", type=int, help="timed CIFAR-phase steps per measurement")
    p.add_argument("--cifar_steps_per_dispatch", help="comma-separated values to time; the fastest "
                   "runs the schedule")
    p.add_argument("--schedule_steps", type=int, help="the CIFAR schedule's length (the paper's: 64000)")
    args = p.parse_args(argv)
    for name, value in SIZES["smoke" if args.smoke else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.jpeg_shape = tuple(args.jpeg_shape)
    try:
        args.cifar_steps_per_dispatch = [int(v) for v in str(args.cifar_steps_per_dispatch).split(",")]
    except ValueError:
        p.error(f"--cifar_steps_per_dispatch={args.cifar_steps_per_dispatch}: comma-separated integers")
    args.loaders = [name for name in args.loaders.split(",") if name]
    unknown = [name for name in args.loaders if name not in config_lib.LOADERS]
    if unknown or not args.loaders:
        p.error(f"--loaders={','.join(args.loaders)}: comma-separated names among "
                f"{', '.join(config_lib.LOADERS)}")
    for name in ("batch_per_device", "image_size", "steps", "workers", "stream_images", "cifar_batch_size",
                 "cifar_steps", "schedule_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be >= 1")
    for n in args.cifar_steps_per_dispatch:
        if n < 1 or args.cifar_steps % n or args.schedule_steps % n:
            p.error(f"--cifar_steps_per_dispatch={n}: must divide --cifar_steps={args.cifar_steps} and "
                    f"--schedule_steps={args.schedule_steps}")
    if not Path(args.fashion_mnist_dir).is_dir():
        p.error(f"--fashion_mnist_dir={args.fashion_mnist_dir} is not a folder; pass a copy of "
                "Fashion-MNIST's IDX files (apt-get install dataset-fashion-mnist puts them in "
                f"{config_lib.FASHION_MNIST_DEBIAN_DIR})")
    out = Path(args.out)
    for name in (JSON_NAME, TABLE_NAME):
        if (out / name).exists():
            p.error(f"{out / name} exists; pass an empty or new --out folder")
    return args


class Budget:
    """Seconds since the start, and what is left of `--budget_s`."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def environment() -> dict:
    from jax.extend.backend import get_backend

    device = jax.devices()[0]
    return dict(
        device_kind=device.device_kind, platform=device.platform, num_devices=jax.device_count(),
        driver=driver_version(), platform_version=get_backend().platform_version,
        versions={name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")},
        python=platform.python_version(), cpu=cpu_model(), cpu_count=os.cpu_count(),
    )


def peak_flops(device_kind: str) -> tuple[float | None, str]:
    for name, flops in PEAK_BF16_FLOPS:
        if name in device_kind:
            return flops, f"published dense bf16 peak of {name}"
    return None, f"no published bf16 peak recorded for {device_kind!r} (PEAK_BF16_FLOPS)"


def peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def initial_state(config, model, parallel: Parallel, key: jax.Array):
    """A fresh train state, replicated over the devices, as training initialises it."""
    return jax.jit(lambda k: init_state(config, model, k), out_shardings=parallel.replicated)(key)


def timed_steps(step, state, inputs_of, steps: int, warmup: int, key: jax.Array):
    """(state, seconds per step) of `steps` steps after `warmup`, each step's inputs from
    `inputs_of()`, waited for once at the end."""
    for _ in range(warmup):
        state, metrics = step(state, inputs_of(), key)
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, inputs_of(), key)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"the training loss is {float(metrics['loss'])}: the timed step is broken")
    return state, seconds


def imagenet_config(args: argparse.Namespace, parallel: Parallel, data_dir: Path):
    """The ImageNet recipe on the generated image folder, in bfloat16, at the check's sizes."""
    config = config_lib.imagenet_recipe(args.imagenet_model, "image_folder")
    config.model.dtype = "bfloat16"
    config.dataset.data_dir = str(data_dir)
    config.dataset.num_classes = 1000  # ImageNet's head, whatever the folder holds
    config.dataset.image_size = args.image_size
    scale = args.image_size / 224  # the recipe's resize sizes, for other crop sides
    config.dataset.scale_range = (round(256 * scale), round(480 * scale))
    config.dataset.eval_resize = round(256 * scale)
    config.dataset.num_workers = args.workers
    config.batch_size = config.eval_batch_size = args.batch_per_device * parallel.num_devices
    config.num_train_steps = args.warmup_steps + args.steps
    config.tensorboard = False
    config_lib.validate(config, parallel.num_devices)
    return config


def synthetic_batch(config, num_classes: int, seed: int = 0) -> dict:
    """A host batch shaped as the streamed pipeline's: uint8 crops, labels, lighting offsets."""
    rng = np.random.default_rng(seed)
    side, n = config.dataset.image_size, config.batch_size
    return {
        "image": rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, n, dtype=np.int32),
        "lighting": np.zeros((n, 3), np.float32),
    }


def imagenet_phase(args: argparse.Namespace, parallel: Parallel, scratch: Path) -> dict:
    data_dir = write_jpegs(scratch / "images", args.stream_images, shape=args.jpeg_shape)
    config = imagenet_config(args, parallel, data_dir)
    model = build_model(config)
    init_key, key = jax.random.split(jax.random.key(config.seed))
    state = initial_state(config, model, parallel, init_key)

    host_batch = synthetic_batch(config, model.num_classes)
    mean, std = augment.normalization_stats(host_batch["image"], config.dataset.normalization)
    norm = Normalization(*(jax.device_put(a, parallel.replicated) for a in (mean, std)))

    def to_devices(batch: dict) -> dict:
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(parallel.batch, x), batch)

    device_batch = to_devices(host_batch)
    start = time.perf_counter()
    step = train.make_stream_train_step(config, model, parallel)
    step = step.lower(state, StreamedBatch(device_batch, norm), key).compile()
    compile_s = time.perf_counter() - start

    result = dict(model=args.imagenet_model, dtype=config.model.dtype, batch_size=config.batch_size,
                  batch_per_device=args.batch_per_device, image_size=args.image_size, compile_s=compile_s)
    state, seconds = timed_steps(step, state, lambda: StreamedBatch(device_batch, norm), args.steps,
                                 args.warmup_steps, key)
    result["on_device"] = dict(images_per_sec=config.batch_size / seconds, step_ms=seconds * 1e3)
    state, seconds = timed_steps(step, state, lambda: StreamedBatch(to_devices(host_batch), norm), args.steps,
                                 args.warmup_steps, key)
    result["from_host"] = dict(images_per_sec=config.batch_size / seconds, step_ms=seconds * 1e3)
    result["loaders"] = {}
    for loader in args.loaders:
        state, result["loaders"][loader] = loader_throughput(args, config, parallel, step, state, key, loader)

    macs = count_macs(model, (1, args.image_size, args.image_size, 3))
    peak, peak_source = peak_flops(jax.devices()[0].device_kind)
    achieved = FLOPS_PER_MAC_TRAINING * macs * result["on_device"]["images_per_sec"]
    result.update(
        macs_per_image=macs, achieved_flops_per_sec=achieved, peak_flops_per_device=peak,
        peak_flops_source=peak_source, mfu=achieved / (peak * parallel.num_devices) if peak else None,
        peak_memory_bytes=peak_memory_bytes(),
    )
    return result


def module_installed(name: str) -> bool:
    """Whether `name` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing ("nvidia" of "nvidia.dali")
        return False


def loader_unavailable(loader: str, config) -> str | None:
    """Why `loader` cannot feed the step here, or None where it can."""
    if loader == "grain":
        if module_installed("grain") and module_installed("PIL"):
            return None
        return "grain or pillow is not installed (pip install -e '.[stream]')"
    if module_installed("nvidia.dali") and module_installed("PIL"):
        return None
    from resnet_jax.data import dali

    return (f"NVIDIA DALI is not installed ({dali.INSTALL}; its wheels are too large for the GPU "
            "machine's wheelhouse, see benchmarks/RESULTS.md)")


def dali_decoder() -> str:
    """Where the DALI loader decodes on this backend: "mixed" (the GPU's nvJPEG) or "cpu"."""
    from resnet_jax.data import dali

    return dali.decoder_device(jax.devices()[0].platform)


def loader_throughput(args, config, parallel: Parallel, step, state, key: jax.Array, loader: str):
    """(state, figures): images/s of the step fed by `loader` from the generated folder, as
    `train.py` opens it (`train.open_inputs`); or why it was skipped, or could not start
    (a `DataError`: the other figures are still measured)."""
    reason = loader_unavailable(loader, config)
    if reason:
        return state, dict(skipped=reason)
    config = config.copy_and_resolve_references()
    config.dataset.loader = loader
    start = time.perf_counter()
    with contextlib.ExitStack() as opened:
        try:
            inputs = train.open_inputs(config, parallel, ("train",))
            batches = opened.enter_context(inputs.train_batches(0))
        except DataError as error:
            return state, dict(failed=str(error))
        open_s = time.perf_counter() - start
        state, seconds = timed_steps(step, state, lambda: next(batches), args.steps, args.warmup_steps, key)
    figures = dict(images_per_sec=config.batch_size / seconds, step_ms=seconds * 1e3,
                   images_in_folder=args.stream_images, jpeg_shape=list(args.jpeg_shape), open_s=open_s)
    if loader == "grain":
        figures.update(workers=args.workers)
    else:
        figures.update(threads=args.workers, decoder=dali_decoder())
    return state, figures


def _loader_figure(loader: str, figures: dict) -> str:
    for outcome in ("skipped", "failed"):
        if outcome in figures:
            return f"{outcome}: {figures[outcome]}"
    detail = (f"{figures['workers']} decoding processes" if loader == "grain" else
              f"decoding {figures['decoder']}, {figures['threads']} CPU threads")
    return f"{figures['images_per_sec']:,.0f} ({detail})"


def cifar_config(args: argparse.Namespace, steps_per_dispatch: int, num_train_steps: int):
    """The paper's CIFAR recipe on Fashion-MNIST at the check's sizes."""
    config = config_lib.cifar_recipe(args.cifar_model, "fashion_mnist")
    config.dataset.data_dir = args.fashion_mnist_dir
    config.batch_size = args.cifar_batch_size
    config.steps_per_dispatch = steps_per_dispatch
    config.num_train_steps = num_train_steps
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        config[key] = min(config[key], num_train_steps)
    config.tensorboard = False
    return config


def cifar_phase(args: argparse.Namespace, parallel: Parallel, budget: Budget) -> dict:
    throughput = {}
    data = train.load_data(cifar_config(args, 1, args.schedule_steps), parallel, ("train",))["train"]
    for n in args.cifar_steps_per_dispatch:
        config = cifar_config(args, n, args.schedule_steps)
        config_lib.validate(config, parallel.num_devices)
        model = build_model(config)
        init_key, key = jax.random.split(jax.random.key(config.seed))
        state = initial_state(config, model, parallel, init_key)
        start = time.perf_counter()
        step = train.make_train_step(config, model, parallel).lower(state, data, key).compile()
        compile_s = time.perf_counter() - start
        _, seconds = timed_steps(step, state, lambda: data, args.cifar_steps // n,
                                 max(1, args.warmup_steps), key)
        step_s = seconds / n
        throughput[str(n)] = dict(compile_s=compile_s, images_per_sec=config.batch_size / step_s,
                                  step_ms=step_s * 1e3, projected_schedule_s=args.schedule_steps * step_s)
    fastest = min(throughput, key=lambda n: throughput[n]["step_ms"])
    result = dict(model=args.cifar_model, batch_size=args.cifar_batch_size,
                  schedule_steps=args.schedule_steps, throughput=throughput,
                  fastest_steps_per_dispatch=int(fastest))
    # The run compiles its train and eval steps again and evaluates 32 times: a margin.
    needed = 1.2 * throughput[fastest]["projected_schedule_s"] + 2 * throughput[fastest]["compile_s"] + 10
    if needed > budget.left():
        result["schedule"] = dict(skipped=f"needs about {needed:.0f} s, {budget.left():.0f} s of "
                                  f"--budget_s={budget.seconds:g} left")
        return result
    config = cifar_config(args, int(fastest), args.schedule_steps)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        final = train.train_and_evaluate(config, workdir)
        seconds = time.perf_counter() - start
    result["schedule"] = dict(seconds=seconds, steps_per_dispatch=int(fastest),
                              test_error=final["eval_error"], test_loss=final["eval_loss"])
    return result


def run_phase(name: str, phases: dict, function, *args) -> None:
    start = time.perf_counter()
    print(f"device_check: {name} ...", flush=True)
    phases[name] = function(*args)
    phases[name]["phase_s"] = time.perf_counter() - start


def _figure(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(report: dict) -> str:
    env, r50, r20 = report["environment"], report["imagenet"], report["cifar"]
    rows = [
        ("device", f"{env['num_devices']} x {env['device_kind']} (driver {env['driver'] or '-'}), "
                   f"jax {env['versions']['jax']}"),
        (f"{r50['model']} compile", f"{r50['compile_s']:.1f} s"),
        (f"{r50['model']} images/s, batch on device",
         f"{r50['on_device']['images_per_sec']:,.0f} ({r50['on_device']['step_ms']:.1f} ms/step)"),
        (f"{r50['model']} images/s, batch copied from host",
         f"{r50['from_host']['images_per_sec']:,.0f} ({r50['from_host']['step_ms']:.1f} ms/step)"),
        *((f"{r50['model']} images/s, {LOADER_NAMES[loader]} loader", _loader_figure(loader, figures))
          for loader, figures in r50["loaders"].items()),
        (f"{r50['model']} MFU (bf16, batch on device)",
         f"{r50['mfu']:.1%} of {r50['peak_flops_per_device'] / 1e12:,.0f} TFLOP/s" if r50["mfu"] is not None
         else f"- ({r50['peak_flops_source']})"),
        (f"{r50['model']} peak device memory",
         "-" if r50["peak_memory_bytes"] is None else f"{r50['peak_memory_bytes'] / 2**30:.2f} GiB"),
    ]
    for n, t in r20["throughput"].items():
        rows.append((f"{r20['model']} images/s, {n} step(s) per dispatch",
                     f"{t['images_per_sec']:,.0f}; {r20['schedule_steps']:,} steps projected "
                     f"{t['projected_schedule_s']:,.1f} s"))
    schedule = r20["schedule"]
    rows.append((f"{r20['model']} {r20['schedule_steps']:,}-step schedule",
                 f"skipped: {schedule['skipped']}" if "skipped" in schedule else
                 f"{schedule['seconds']:,.0f} s, test error {schedule['test_error']:.2%}"))
    rows.append(("total", f"{report['total_s']:.0f} s of --budget_s={report['flags']['budget_s']:g}"))
    lines = ["| what | figure |", "|---|---|", *(f"| {what} | {figure} |" for what, figure in rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    backend.keep_freed_memory_on_cpu()  # as train.py does: on the CPU only, before JAX starts its threads
    budget = Budget(args.budget_s)
    parallel = data_parallel()
    report = {"flags": {k: v for k, v in vars(args).items()}, "command": " ".join(sys.argv)}
    phases = {}
    run_phase("environment", phases, environment)
    with tempfile.TemporaryDirectory() as scratch:
        run_phase("imagenet", phases, imagenet_phase, args, parallel, Path(scratch))
    run_phase("cifar", phases, cifar_phase, args, parallel, budget)
    report.update(phases, total_s=budget.elapsed())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2)
    (out / JSON_NAME).write_text(text + "\n")
    markdown = table(report)
    (out / TABLE_NAME).write_text(markdown)
    print(text)
    print(markdown, flush=True)


if __name__ == "__main__":
    main()
