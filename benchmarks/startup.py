"""Start-up with JAX's persistent compilation cache: time to the first training steps, cold vs warm.

    python benchmarks/startup.py --model=resnet50 --batch_size=8 --image_size=224 [--repeats=1]

Each run is a fresh process of `benchmarks/train_throughput.py --steps=1` (the training
step `train.py` runs, on synthetic data on the devices), timed from its start to its exit:
importing JAX, putting the data on the devices, initialising the state, compiling the step,
one warm-up and one timed step. "cold" runs with an empty cache directory, which it fills;
"warm" runs with the directory the cold run left. A first run with the cache off builds
the native convolution kernels and measures the convolution choices (`resnet_jax/cpu/`)
where that was not done yet, so cold and warm differ in the compilation cache alone.

Printed last, one JSON line: `cold_s` and `warm_s` (the median over `--repeats` pairs of
each run's wall time), `saving_s`, each run's `compile_s` (the step's compilation, or its
load from the cache, as train_throughput.py reports it), and the arguments.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THROUGHPUT = Path(__file__).resolve().parent / "train_throughput.py"


def run(args: argparse.Namespace, cache_dir: str) -> tuple[float, dict]:
    """(wall seconds, train_throughput.py's JSON) of one fresh process."""
    command = [sys.executable, str(THROUGHPUT), f"--model={args.model}", f"--batch_size={args.batch_size}",
               f"--image_size={args.image_size}", "--steps=1", f"--compilation_cache_dir={cache_dir}"]
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(out.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="any name of resnet_jax.list_models()")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="cold/warm pairs, each with a new cache")
    args = p.parse_args(argv)

    run(args, "")  # kernels built and convolution choices measured, if they were not
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache_dir:
            cold.append(run(args, cache_dir))
            warm.append(run(args, cache_dir))
    cold_s, warm_s = (statistics.median(wall for wall, _ in runs) for runs in (cold, warm))
    print(json.dumps(dict(
        cold_s=round(cold_s, 2), warm_s=round(warm_s, 2), saving_s=round(cold_s - warm_s, 2),
        cold_compile_s=[round(result["compile_s"], 2) for _, result in cold],
        warm_compile_s=[round(result["compile_s"], 2) for _, result in warm],
        **vars(args),
    )), flush=True)


if __name__ == "__main__":
    main()
