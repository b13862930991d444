"""`python -m resnet_jax.experiments.train_one WORKDIR < config.json`: one run of an
experiment, trained in its own process (how `--jobs` puts runs on separate devices).

The config comes as JSON on stdin (as `config.to_dict` writes it), so the parent's exact
config, built in code, is what trains here.
"""

import argparse
import json
import sys

from resnet_jax import cli
from resnet_jax import config as config_lib
from resnet_jax.train import train_and_evaluate


def main(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> None:
    config = config_lib.from_dict(json.load(sys.stdin))
    config_lib.apply_overrides(config, overrides)
    train_and_evaluate(config, args.workdir)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", help="the run's workdir; its config arrives as JSON on stdin")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
