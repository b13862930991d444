"""Throughput of the DALI loader alone (no training step), on this machine's devices.

    python benchmarks/dali_pipeline.py [--threads 1 2] [--batch 256] [--batches 4]
                                       [--augment scale_crop_flip] [--images 512]

Writes a folder of JPEGs of ImageNet's typical size (500x375, quality 90, smooth content:
`input_pipeline.write_jpegs`), then for each DALI thread count (`dataset.num_workers`)
opens the training pipeline of `configs/imagenet.py:resnet50` with `dataset.loader =
"dali"` (decoding with `device="mixed"` on a GPU, `"cpu"` elsewhere) and, after one
warm-up batch, times `--batches` global batches arriving on the devices. It also times the
host's part alone: the training process planning the same batches (`dali_feed.TrainFeed`:
file reads, image headers, the seeded draws) in its one thread, the ceiling of what it can
feed however fast DALI decodes. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from input_pipeline import write_jpegs


def config_for(data_dir: Path, augment: str, threads: int, batch: int, batches: int):
    from resnet_jax.config import imagenet_recipe

    config = imagenet_recipe("resnet50", "image_folder")
    config.dataset.update(dict(data_dir=str(data_dir), augment=augment, num_workers=threads, loader="dali"))
    config.batch_size, config.num_train_steps = batch, batches + 1
    return config


def feed_rate(config, batches: int) -> float:
    """Images/s the host plans in one thread (no decoding)."""
    from resnet_jax.data import dali_feed, image_records, stream

    train = image_records.ImageFolder(config.dataset.data_dir, "train")
    positions = stream._Positions(config.batch_size, 0, 1)
    feed = dali_feed.TrainFeed(train, stream._Settings.of(config), positions, start_step=0)

    class Info:
        iteration = 0

    feed(Info())  # warm-up: the epoch's permutation, the files in the page cache
    start = time.perf_counter()
    for Info.iteration in range(1, batches + 1):
        feed(Info())
    return batches * config.batch_size / (time.perf_counter() - start)


def pipeline_rate(config, batches: int) -> float:
    """Images/s of whole batches arriving on the devices."""
    import jax

    from resnet_jax.data.dali import DaliData
    from resnet_jax.parallel import data_parallel

    data = DaliData(config, data_parallel(), ("train",))
    with data.train_batches(0) as inputs:
        jax.block_until_ready(next(inputs).batch)  # warm-up: the pipelines' queues filled
        start = time.perf_counter()
        for _ in range(batches):
            jax.block_until_ready(next(inputs).batch)
        return batches * config.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="DALI CPU threads per host")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per thread count")
    parser.add_argument("--augment", default="scale_crop_flip",
                        choices=("scale_crop_flip", "random_resized_crop"))
    parser.add_argument("--images", type=int, default=512, help="JPEGs in the generated folder")
    args = parser.parse_args()
    import jax
    from nvidia import dali

    device = jax.devices()[0]
    print(f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, "
          f"{jax.device_count()} x {device.device_kind}; python {platform.python_version()}, "
          f"jax {jax.__version__}, DALI {dali.__version__}; batch {args.batch}, {args.augment}, "
          "500x375 JPEG -> 224")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_jpegs(Path(tmp), args.images)
        plan = feed_rate(config_for(data_dir, args.augment, 1, args.batch, args.batches), args.batches)
        print(f"host plan alone (one thread): {plan:.0f} images/s")
        print("| DALI threads | images/s | images/s per thread |")
        print("|---|---|---|")
        rates = {}
        for threads in args.threads:
            config = config_for(data_dir, args.augment, threads, args.batch, args.batches)
            rate = pipeline_rate(config, args.batches)
            rates[threads] = rate
            print(f"| {threads} | {rate:.0f} | {rate / threads:.0f} |", flush=True)
    print(json.dumps({"device": device.device_kind, "platform": device.platform, "augment": args.augment,
                      "batch": args.batch, "plan_images_per_sec": plan,
                      "images_per_sec": {str(k): v for k, v in rates.items()}}))


if __name__ == "__main__":
    main()
