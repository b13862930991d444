"""Evaluate a checkpoint of a run trained by train.py; prints one JSON line.

python evaluate.py --workdir=runs/r20 [--step=latest|best|N] [--split=test]
python evaluate.py --workdir=runs/imagenet_resnet50 --mode=center|ten_crop|multi_scale
    [--multi_scale_average=scores|probabilities] [--eval_batch_size=N] [--num_workers=N]
    [--loader=grain|dali]

--eval_batch_size, --num_workers and --loader replace the run's eval_batch_size,
dataset.num_workers and dataset.loader, so that a run trained on many devices evaluates
on one machine (and one trained through DALI on a GPU node evaluates where Grain decodes):
the batch must be a positive multiple of this machine's device count (it is not rounded;
anything else is refused with exit status 2 before anything compiles). An evaluation set
smaller than the batch is scored as one batch of its own size, rounded up to the device
count.
"""

import argparse
import json
import sys

import jax

from resnet_jax import cli, scoring
from resnet_jax.config import LOADERS
from resnet_jax.data.image_records import STREAM_SPLITS
from resnet_jax.data.sources import SPLITS
from resnet_jax.evaluate import evaluate_workdir


def main(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> None:
    cli.initialize_distributed(args)
    if overrides:
        raise cli.ConfigError(
            "evaluate.py takes no --config.* overrides: the run's saved config is used; "
            "flags: --workdir, --step, --split, --data_dir, --mode, --multi_scale_average, "
            "--eval_batch_size, --num_workers, --loader"
        )
    result = evaluate_workdir(args.workdir, args.step, args.split, args.data_dir, args.mode,
                              args.multi_scale_average, args.eval_batch_size, args.num_workers, args.loader)
    if jax.process_index() == 0:  # every process evaluates; one prints
        print(json.dumps(result))


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir written by train.py (a local folder or gs://...)")
    p.add_argument("--step", default="latest", help="latest (default), best (lowest eval error), or a number")
    p.add_argument("--split", default=None, choices=sorted(set(SPLITS + STREAM_SPLITS)),
                   help="default: the run's eval split")
    p.add_argument("--data_dir", default=None, help="read the data from here instead of the saved path")
    p.add_argument("--mode", default="center", choices=scoring.MODES,
                   help="center crop (default); ten_crop or multi_scale: the paper's testing, "
                        "for streamed datasets (image_folder, imagenet2012, imagenette)")
    p.add_argument("--multi_scale_average", default="scores", choices=scoring.AVERAGES,
                   help="multi_scale: scores (default; the paper's reference, VGG's testing): each "
                        "view's class-score map averaged over the image, then its softmax averaged "
                        "over flips and scales; probabilities: the softmax at every location averaged")
    p.add_argument("--eval_batch_size", type=int, default=None,
                   help="global eval batch, a positive multiple of the device count (default: the run's)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="streamed datasets: decoding processes per host, -1 one per CPU core, 0 in this "
                        "process (default: the run's dataset.num_workers); with DALI, its CPU threads")
    p.add_argument("--loader", default=None, choices=LOADERS,
                   help="streamed datasets: grain (host decoding) or dali (decoding on NVIDIA GPUs, "
                        "pip install -e '.[dali]'); default: the run's dataset.loader")
    cli.add_distributed_flags(p)
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
