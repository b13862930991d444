"""Throughput and memory of the streamed input pipeline alone (no device): decode + augment
on the host, batched per host.

    python benchmarks/input_pipeline.py [--workers 1 2] [--batch 1024] [--batches 2]
                                        [--augment scale_crop_flip]
    python benchmarks/input_pipeline.py --source=decoded [--workers 1] [--batch 512] [--batches 8]

`--source=decoded`: the host-side ceiling of one training process. A source returns a ready
224x224x3 uint8 image and a label (decoding costs nothing), taken through `HostBatches`
with the given worker counts; the figure is the CPU time of this, the training, process
(`time.process_time()`, all its threads, not the workers') per example over `--batches`
batches after a warm-up of one batch per reused batch buffer (`HostBatches.RING`: the
kernel zeroes a buffer's pages at its first use, a cost paid once per run): the part of
the input path that more cores cannot spread. Its last line is a JSON object:
`ceiling_images_per_sec` (1 / that time, for the last worker count),
`trainer_cpu_us_per_example`, the worker count, batch and CPU flags.

`--source=jpeg` (the default):

Writes a folder of JPEGs of ImageNet's typical size (500x375, quality 90, smooth content
like photographs rather than noise), then takes batches of `StreamedData.train_dataset`
(the training pipeline of `configs/imagenet.py:resnet50`: decode with pillow, shorter
side in [256, 480], random 224 crop, flip, PCA lighting) through `HostBatches` with each
worker count and the config's read threads and buffers. After one warm-up batch (workers
started, buffers filled) it times `--batches` batches and prints images/s, images/s per
worker process (per core, when each worker has one), the bound on examples decoded ahead
(`PipelineOptions.examples_ahead`) and the peak memory of the whole process tree (the
measuring process, a fresh one per worker count, and its workers) while streaming,
sampled every 50 ms from /proc: the sum of
resident sets (RSS, which counts pages shared between the processes, such as libraries
and the workers' rings, once per process) and of proportional sets (PSS, shared pages split
between their processes: the tree's real footprint). Linux only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def write_jpegs(root: Path, count: int, classes: int = 4, shape: tuple[int, int] = (375, 500)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows, cols = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    for i in range(count):
        folder = root / "train" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        phases = rng.uniform(0, 2 * np.pi, (3, 2))
        freq = rng.uniform(2, 12, (3, 2))
        channels = [np.sin(freq[c, 0] * np.pi * rows + phases[c, 0])
                    * np.cos(freq[c, 1] * np.pi * cols + phases[c, 1]) for c in range(3)]
        pixels = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 8, (*shape, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    (root / "val" / "class_0").mkdir(parents=True, exist_ok=True)
    return root


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, from each process's parent in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # ended meanwhile
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name, in parentheses, may hold spaces
            children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += children.get(pid, [])
    return tree


def tree_memory(root: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over `root`'s process tree (/proc/PID/smaps_rollup)."""
    rss = pss = 0
    for pid in process_tree(root):
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024
                  for line in lines[1:] if line.endswith("kB")}
        rss, pss = rss + fields.get("Rss", 0), pss + fields.get("Pss", 0)
    return rss, pss


class PeakMemory:
    """Samples `tree_memory` of this process's tree every `interval` s in a thread; `peak`
    holds the largest (RSS, PSS) seen, each on its own."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss, pss = tree_memory(os.getpid())
            self.peak = (max(self.peak[0], rss), max(self.peak[1], pss))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(data_dir: Path, workers: int, batch: int, batches: int, augment: str) -> dict:
    from resnet_jax.config import imagenet_recipe
    from resnet_jax.data.stream import HostBatches, StreamedData
    from resnet_jax.parallel import data_parallel

    config = imagenet_recipe("resnet50", "image_folder")
    config.dataset.data_dir = str(data_dir)
    config.dataset.augment = augment
    config.dataset.num_workers = workers
    config.batch_size = batch
    config.num_train_steps = batches + 1
    data = StreamedData(config, data_parallel(), ("train",))
    before = tree_memory(os.getpid())
    with PeakMemory() as memory:
        host = HostBatches(data.train_dataset(0), batch, data.pipeline)
        try:
            next(host)  # warm-up: start the workers, fill their buffers
            start = time.perf_counter()
            for _ in range(batches):
                next(host)
            seconds = time.perf_counter() - start
        finally:
            host.close()
    return dict(rate=batches * batch / seconds, ahead=data.pipeline.examples_ahead(batch), before=before,
                peak=memory.peak)


class DecodedSource:
    """`count` ready 224x224x3 uint8 images and labels: examples whose decoding costs nothing."""

    def __init__(self, count: int = 64, size: int = 224):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (count, size, size, 3), np.uint8)

    def __len__(self) -> int:
        return 2**30

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index % len(self.images)], "label": np.int32(index % 1000),
                "lighting": np.zeros(3, np.float32)}


def measure_decoded(workers: int, batch: int, batches: int) -> dict:
    import grain

    from resnet_jax.data.stream import HostBatches, PipelineOptions

    dataset = grain.MapDataset.range((batches + HostBatches.RING) * batch).map(DecodedSource().__getitem__)
    host = HostBatches(dataset, batch, PipelineOptions(workers, read_threads=16, read_buffer=500,
                                                       worker_buffer=4), reuse=True)
    try:
        for _ in range(HostBatches.RING):  # warm-up: start the workers, touch every batch buffer once
            next(host)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(batches):
            next(host)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        host.close()
    return dict(cpu_us=cpu / (batches * batch) * 1e6, wall_rate=batches * batch / wall)


def cpu_flags() -> list[str]:
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(words & {"avx2", "avx512f"})


def main_decoded(args) -> None:
    print("| workers | trainer CPU per example | ceiling per training process | wall-clock images/s |")
    print("|---|---|---|---|")
    for workers in args.workers:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
            m = fresh.submit(measure_decoded, workers, args.batch, args.batches).result()
        ceiling = 1e6 / m["cpu_us"]
        print(f"| {workers} | {m['cpu_us']:.1f} us | {ceiling:.0f} images/s | {m['wall_rate']:.0f} |",
              flush=True)
    print(json.dumps(dict(ceiling_images_per_sec=round(1e6 / m["cpu_us"]),
                          trainer_cpu_us_per_example=round(m["cpu_us"], 2), workers=workers,
                          batch=args.batch, batches=args.batches, image="224x224x3 uint8",
                          cpu=platform.processor() or platform.machine(), cpu_flags=cpu_flags())))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="jpeg", choices=("jpeg", "decoded"),
                        help="jpeg: decode and augment generated JPEGs; decoded: ready 224x224 arrays")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker processes (0: decode in this process, by threads)")
    parser.add_argument("--batch", type=int, default=None, help="examples a batch (jpeg: 1024, decoded: 512)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per worker count "
                        "(jpeg: 2, decoded: 8)")
    parser.add_argument("--augment", default="scale_crop_flip",
                        choices=("scale_crop_flip", "random_resized_crop"))
    args = parser.parse_args()
    decoded = args.source == "decoded"
    args.batch = args.batch or (512 if decoded else 1024)
    args.batches = args.batches or (8 if decoded else 2)
    if decoded:
        return main_decoded(args)
    import grain
    import jax
    import PIL

    print(f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs; "
          f"python {platform.python_version()}, jax {jax.__version__}, grain {grain.__version__}, "
          f"pillow {PIL.__version__}; batch {args.batch}, {args.augment}, 500x375 JPEG -> 224")
    print("| workers | images/s | images/s per worker | examples ahead (bound) | "
          "tree RSS before | peak tree RSS | peak tree PSS |")
    print("|---|---|---|---|---|---|---|")
    mb = 1e6
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_jpegs(Path(tmp), 512)
        for workers in args.workers:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
                m = fresh.submit(measure, data_dir, workers, args.batch, args.batches, args.augment).result()
            per_worker = f"{m['rate'] / workers:.0f}" if workers else "-"
            print(f"| {workers} | {m['rate']:.0f} | {per_worker} | {m['ahead']} | "
                  f"{m['before'][0] / mb:.0f} MB | {m['peak'][0] / mb:.0f} MB | {m['peak'][1] / mb:.0f} MB |",
                  flush=True)


if __name__ == "__main__":
    main()
