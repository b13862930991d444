"""Throughput of the streamed input pipeline alone (no device): decode + augment on the host.

    python benchmarks/input_pipeline.py [--images 256] [--workers 1 2] [--augment scale_crop_flip]

Writes a folder of JPEGs of ImageNet's typical size (500x375, quality 90, smooth content
like photographs rather than noise), then times `StreamedData.train_dataset` (the
training pipeline of `configs/imagenet.py:resnet50`: decode with pillow, shorter side in
[256, 480], random 224 crop, flip, PCA lighting) through Grain with each worker count.
Prints images/s and images/s per worker process (per core, when each worker has one).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import tempfile
import time
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


def measure(data_dir: Path, workers: int, images: int, augment: str, batch: int = 32) -> float:
    from resnet_jax.config import imagenet_recipe
    from resnet_jax.data.stream import HostBatches, StreamedData
    from resnet_jax.parallel import data_parallel

    config = imagenet_recipe("resnet50", "image_folder")
    config.dataset.data_dir = str(data_dir)
    config.dataset.augment = augment
    config.dataset.num_workers = workers
    config.batch_size = batch
    steps = images // batch
    config.num_train_steps = 2 * steps + 1000
    data = StreamedData(config, data_parallel(), ("train",))
    host = HostBatches(data.train_dataset(0), workers)
    try:
        for _ in range(steps):  # warm-up: start the workers, fill their buffers
            next(host)
        start = time.perf_counter()
        for _ in itertools.islice(host, steps):
            pass
        return steps * batch / (time.perf_counter() - start)
    finally:
        host.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="timed images per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--augment", default="scale_crop_flip",
                        choices=("scale_crop_flip", "random_resized_crop"))
    args = parser.parse_args()
    import grain
    import jax
    import PIL

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"python {platform.python_version()}, jax {jax.__version__}, grain {grain.__version__}, "
          f"pillow {PIL.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_jpegs(Path(tmp), 512)
        for workers in args.workers:
            rate = measure(data_dir, workers, args.images, args.augment)
            print(f"{args.augment}, 500x375 JPEG -> 224: {workers} worker(s): {rate:.0f} images/s, "
                  f"{rate / workers:.0f} images/s per worker", flush=True)


if __name__ == "__main__":
    main()
