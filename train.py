"""Train a network of the paper from a config file.

    python train.py --config=configs/cifar.py:resnet20,cifar10 --workdir=runs/r20 [--config.KEY=VALUE ...]

--config is a config file defining get_config(); FILE:ARG passes ARG to get_config(ARG)
(configs/cifar.py:MODEL[,DATASET], configs/imagenet.py:MODEL[,SHORTCUT], ...).

Rerunning the same command resumes from the workdir's latest checkpoint.
"""

import argparse
import os
import signal
import sys

try:  # JAX, Flax and Orbax load here: seconds, on a busy machine, in which a user may press Ctrl-C
    from resnet_jax import cli
    from resnet_jax import config as config_lib
    from resnet_jax.train import train_and_evaluate
except KeyboardInterrupt:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the message
    print("\ninterrupted while starting: nothing was run or written", file=sys.stderr, flush=True)
    # Not sys.exit: half-imported libraries' exit handlers could fail with tracebacks of their own.
    os._exit(128 + signal.SIGINT)  # cli.run's status for Ctrl-C before training


def main(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> None:
    cli.initialize_distributed(args)
    config = config_lib.load(args.config)
    config_lib.apply_overrides(config, overrides)
    train_and_evaluate(config, args.workdir, allow_config_change=args.allow_config_change)


def parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", required=True, help="a config file defining get_config(), and after ':' its argument, "
        "e.g. configs/cifar10_resnet20.py or configs/cifar.py:resnet110,cifar10"
    )
    p.add_argument("--workdir", required=True, help="where config.json, metrics.jsonl and checkpoints go: "
                   "a local folder or gs://bucket/path (pip install -e '.[gcs]')")
    p.add_argument(
        "--allow_config_change", action="store_true",
        help="continue a workdir whose saved config differs (e.g. more steps); its config.json is kept",
    )
    cli.add_distributed_flags(p)
    return p


if __name__ == "__main__":
    status = cli.run(main, parser())
    # Only the interpreter's exit is left: a Ctrl-C now would break libraries' exit handlers
    # (tracebacks), and there is nothing left to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)
