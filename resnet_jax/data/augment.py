"""Augmentation and normalisation that run on the device, inside the compiled step.

Everything here is a pure function of a batch and a PRNG key, so a step's batch is a
function of (seed, step) alone: resuming a run reproduces it exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def normalization_stats(images: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) in [0, 1] pixel units, from the training images (uint8 NHWC).

    "per_pixel_mean": the paper's CIFAR preprocessing, a mean image (H, W, C) and std 1;
    "per_channel_mean_std": the usual ImageNet-style per-channel mean and std.
    """
    pixels = images.astype(np.float64) / 255.0
    if kind == "per_pixel_mean":
        return pixels.mean(axis=0).astype(np.float32), np.ones(images.shape[-1], np.float32)
    mean = pixels.mean(axis=(0, 1, 2))
    std = pixels.std(axis=(0, 1, 2))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def normalize(images: jnp.ndarray, mean: jnp.ndarray, std: jnp.ndarray) -> jnp.ndarray:
    """uint8 images -> float32, mean subtracted, divided by std."""
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def pad_crop_flip(key: jax.Array, images: jnp.ndarray, padding: int) -> jnp.ndarray:
    """The paper's CIFAR augmentation (Sec. 4.2): pad each side by `padding` with zeros
    (the mean, after normalisation), take a random crop of the original size, and flip
    it horizontally with probability 1/2; independently for every image."""
    n, height, width, channels = images.shape
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    crops = jax.vmap(crop)(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
    return jnp.where(flip, crops[:, :, ::-1, :], crops)
