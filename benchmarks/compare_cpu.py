"""JAX (each convolution path) against the PyTorch reference, on the same CPU, back to back.

    python benchmarks/compare_cpu.py [--model=resnet20] [--batch_size=128] [--steps=10] \
        [--convs=xla,auto] [--steps_per_dispatch=1] [--rounds=1] [--threads=2] [--loads=0,1]

Runs `train_throughput.py` once per path and `torch_resnet20.py`, each in its own process,
one after the other, `rounds` times (interleaved, so that a change in the machine's load
hits every variant alike), and prints every JSON line, then one summary line: each
variant's median images/s over the rounds, its ratio to PyTorch's and to `conv="xla"`'s.
`--loads`: the numbers of other training jobs to run meanwhile (each a
`train_throughput.py` of the same model, default path, started before the variants and
stopped after), every variant being timed under each, in the same rounds; the summary
has one entry per load. The JAX processes see every core and the reference `--threads`
of them; on a machine shared with other jobs compare only numbers from one run of this
script (the summary records the load average when it started).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_json(command: list[str]) -> dict:
    """The last line of a benchmark's output, parsed."""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    line = result.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    return json.loads(line)


def start_load(jobs: int, model: str, batch_size: int) -> list[subprocess.Popen]:
    """`jobs` training processes that step until stopped."""
    command = [sys.executable, str(HERE / "train_throughput.py"), f"--model={model}",
               f"--batch_size={batch_size}", "--steps=1000000"]
    return [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(jobs)]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="a CIFAR ResNet (resnetD, D = 6n+2)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--convs", default="xla,auto",
                   help="comma-separated convolution paths to time (the config's model.conv)")
    p.add_argument("--steps_per_dispatch", type=int, default=1,
                   help="JAX training steps per compiled call (PyTorch runs one step per call)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="PyTorch's threads")
    p.add_argument("--loads", default="0,1",
                   help="comma-separated numbers of other training jobs to time every variant under")
    args = p.parse_args()
    loads = [int(load) for load in args.loads.split(",")]
    load_average = os.getloadavg()
    depth = int(args.model.removeprefix("resnet"))
    common = [f"--batch_size={args.batch_size}", f"--steps={args.steps}"]
    variants = {
        f"jax_{conv}": [sys.executable, str(HERE / "train_throughput.py"), f"--model={args.model}",
                        f"--conv={conv}", f"--steps_per_dispatch={args.steps_per_dispatch}", *common]
        for conv in args.convs.split(",")
    }
    variants["torch"] = [sys.executable, str(HERE / "torch_resnet20.py"), f"--depth={depth}",
                         f"--threads={args.threads}", *common]
    rates = {load: {name: [] for name in variants} for load in loads}
    for _ in range(args.rounds):
        for load in loads:
            jobs = start_load(load, args.model, args.batch_size)
            try:
                for name, command in variants.items():
                    rates[load][name].append(run_json(command)["images_per_sec"])
            finally:
                stop(jobs)
    summary = {}
    for load, load_rates in rates.items():
        medians = {name: statistics.median(values) for name, values in load_rates.items()}
        summary[f"load={load}"] = dict(
            images_per_sec=medians,
            ratio_to_torch={name: rate / medians["torch"] for name, rate in medians.items()},
            ratio_to_xla={name: rate / medians["jax_xla"] for name, rate in medians.items()}
            if "jax_xla" in medians else None,
        )
    print(json.dumps(dict(
        summary, model=args.model, batch_size=args.batch_size, steps=args.steps,
        steps_per_dispatch=args.steps_per_dispatch, rounds=args.rounds,
        load_average_at_start=load_average,
    )), flush=True)


if __name__ == "__main__":
    main()
