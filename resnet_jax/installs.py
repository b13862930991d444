"""`python -m resnet_jax.installs --config=FILE[:ARG] [--config.KEY=VALUE ...]`: what a run of
that config needs installed beyond the base requirements, one item a line, for `make train`
to install once and only where a config needs it:

    deb:PACKAGE   a Debian package whose files the config reads (Fashion-MNIST's)
    extra:NAME    an extra of pyproject.toml (`pip install -e .[NAME]`)

A config that cannot be read prints nothing: train.py, run next, says what is wrong.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import ml_collections

from resnet_jax import config as config_lib
from resnet_jax.cli import split_overrides
from resnet_jax.data.image_records import STREAMED_DATASETS

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"  # installs config.FASHION_MNIST_DEBIAN_DIR


def needed(config: ml_collections.ConfigDict, debian_dir_exists: bool) -> list[str]:
    """The items (`deb:...`, `extra:...`) a run of `config` needs; `debian_dir_exists`:
    whether Debian's Fashion-MNIST files are installed."""
    dataset = config.dataset
    if dataset.name == "fashion_mnist" and dataset.data_dir in ("", config_lib.FASHION_MNIST_DEBIAN_DIR):
        # The recipe reads Debian's files once they are there (config.cifar_recipe).
        return [] if debian_dir_exists else [f"deb:{FASHION_MNIST_PACKAGE}"]
    items = []
    if not dataset.data_dir:  # named datasets without local files are read through TFDS
        # tfds-prepare: tensorflow, which prepares a TFDS dataset the first time.
        items += ["extra:tfds"] + ([] if dataset.name in STREAMED_DATASETS else ["extra:tfds-prepare"])
    if dataset.name in STREAMED_DATASETS:  # the loader's own extra: Grain, or DALI
        items.append("extra:dali" if dataset.loader == "dali" else "extra:stream")
    return items


def main(argv: Sequence[str]) -> None:
    try:
        rest, overrides = split_overrides(argv)
        [spec] = [arg.partition("=")[2] for arg in rest if arg.startswith("--config=")][-1:]
        config = config_lib.load(spec)
        config_lib.apply_overrides(config, overrides)
    except ValueError:  # no --config, or one that cannot be read (a ConfigError)
        return
    print("\n".join(needed(config, os.path.isdir(config_lib.FASHION_MNIST_DEBIAN_DIR))))


if __name__ == "__main__":
    main(sys.argv[1:])
