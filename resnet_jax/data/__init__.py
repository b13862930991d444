"""Where examples come from and how they become device batches."""

from resnet_jax.data.sources import DATASETS, DataError, Split, load_split

__all__ = ["DATASETS", "DataError", "Split", "load_split"]
