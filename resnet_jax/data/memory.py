"""Small datasets held on the devices, batched inside the compiled step.

A split (CIFAR's 50k images are 150 MB as uint8) is put on every device once; each
training step draws its examples from a per-epoch permutation of the seed, so the host
does no per-step work and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.data.augment import normalize, pad_crop_flip
from resnet_jax.data.sources import DataError, Split


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceData:
    """A split on the devices (replicated) with its normalisation statistics."""

    images: jax.Array  # uint8 (N, H, W, C)
    labels: jax.Array  # int32 (N,)
    mean: jax.Array  # float32, broadcastable to (H, W, C)
    std: jax.Array  # float32, (C,)

    @property
    def num_examples(self) -> int:
        return self.labels.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EvalBatchIndex:
    """An eval step's input: batch `index` (in order) of the split `data` on the devices."""

    data: DeviceData
    index: jax.Array  # int32 scalar


def put_on_devices(
    split: Split, mean: np.ndarray, std: np.ndarray, sharding: jax.sharding.Sharding
) -> DeviceData:
    """Replicate a split on every device of the mesh. Each process passes the whole split
    it read (a small dataset's tens of MB); each device then gathers its own share of
    every batch, so no batch crosses between hosts."""
    arrays = (split.images, split.labels, mean, std)
    return DeviceData(*(jax.make_array_from_process_local_data(sharding, a) for a in arrays))


def check_batch_fits(split: Split, batch_size: int, what: str) -> None:
    if len(split.labels) < batch_size:
        raise DataError(
            f"the {what} split has {len(split.labels)} examples, fewer than batch_size={batch_size}; "
            f"use a batch_size of at most {len(split.labels)}"
        )


def train_batch(
    data: DeviceData, step: jax.Array, key: jax.Array, batch_size: int, augment: str, padding: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The normalised, augmented batch of training step `step` (traceable).

    Each epoch is a fresh permutation of the split (`fold_in(key, epoch)`); its last
    N mod batch_size examples are left out of that epoch, as a drop-remainder loader does.
    """
    steps_per_epoch = data.num_examples // batch_size
    epoch, position = step // steps_per_epoch, step % steps_per_epoch
    permutation_key, augment_key = jax.random.split(key)
    order = jax.random.permutation(jax.random.fold_in(permutation_key, epoch), data.num_examples)
    indices = jax.lax.dynamic_slice_in_dim(order, position * batch_size, batch_size)
    images = normalize(data.images[indices], data.mean, data.std)
    if augment == "pad_crop_flip":
        images = pad_crop_flip(jax.random.fold_in(augment_key, step), images, padding)
    return images, data.labels[indices]


def num_eval_batches(data: DeviceData, batch_size: int) -> int:
    return -(-data.num_examples // batch_size)


def eval_batch(
    data: DeviceData, index: jax.Array, batch_size: int
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Batch `index` of the split in order, the last one padded: (images, labels, mask).

    The mask is False on padding, so every example is scored exactly once.
    """
    positions = index * batch_size + jnp.arange(batch_size)
    mask = positions < data.num_examples
    indices = jnp.minimum(positions, data.num_examples - 1)
    return normalize(data.images[indices], data.mean, data.std), data.labels[indices], mask
