"""Augmentation, evaluation crops and normalisation.

Small datasets are augmented on the device, inside the compiled step (`pad_crop_flip`);
streamed datasets on the host, one image at a time, with numpy and Pillow (the functions
taking a `numpy.random.Generator`: the paper's scale augmentation and lighting, the
modern random-resized-crop, and the center / ten-crop / whole-image multi-scale views).
Either way everything is a pure function of the images and a seed, so a step's batch is
a function of (seed, step) alone: resuming a run reproduces it exactly.
"""

from __future__ import annotations

import math

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


def inside(valid: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """(N, height, width) bool: where each image of size `valid[n]` (N, 2), placed in the
    top-left corner of a height x width canvas, is (multi-scale testing's canvases)."""
    rows = jnp.arange(height)[None, :, None] < valid[:, 0, None, None]
    columns = jnp.arange(width)[None, None, :] < valid[:, 1, None, None]
    return rows & columns


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


# --- Streamed datasets: on the host, per image (uint8 HWC numpy arrays) -------------------

# AlexNet's PCA lighting (Krizhevsky et al. 2012), with ImageNet's RGB eigenvalues and
# eigenvectors (as columns) of the pixel covariance, in [0, 1] pixel units.
IMAGENET_EIGENVALUES = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_EIGENVECTORS = np.array(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]], np.float32
)


def shorter_side_shape(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) of an image resized, aspect kept, so that its shorter side is `side`."""
    scale = side / min(height, width)
    return max(side, round(height * scale)), max(side, round(width * scale))


def resize_shorter(image: np.ndarray, side: int) -> np.ndarray:
    """`image` resized (bilinear, antialiased) so that its shorter side is `side`."""
    height, width = image.shape[:2]
    if min(height, width) == side:
        return image
    new_height, new_width = shorter_side_shape(height, width, side)
    return _pillow_resize(image, (new_width, new_height))


def _pillow_resize(image: np.ndarray, size: tuple[int, int], box: tuple | None = None) -> np.ndarray:
    from PIL import Image  # only streamed datasets need pillow

    resized = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized)


def crop(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return image[top : top + size, left : left + size]


def scale_crop_params(rng: np.random.Generator, height: int, width: int, scale_range: tuple[int, int],
                      size: int) -> tuple[int, int, int, bool]:
    """(shorter side, top, left, flip) of one scale augmentation: the side uniform over the
    integers of `scale_range`, the crop uniform over the positions inside the resized image."""
    side = int(rng.integers(scale_range[0], scale_range[1] + 1))
    new_height, new_width = shorter_side_shape(height, width, side)
    top = int(rng.integers(0, new_height - size + 1))
    left = int(rng.integers(0, new_width - size + 1))
    return side, top, left, flip_draw(rng)


def flip_draw(rng: np.random.Generator) -> bool:
    """Whether a training view is flipped horizontally: p = 1/2."""
    return bool(rng.random() < 0.5)


def scale_crop_flip(rng: np.random.Generator, image: np.ndarray, scale_range: tuple[int, int],
                    size: int) -> np.ndarray:
    """The paper's ImageNet augmentation (Sec. 3.4): shorter side resized to a uniform
    random integer in `scale_range`, a random `size` x `size` crop, flipped with p = 1/2."""
    side, top, left, flip = scale_crop_params(rng, *image.shape[:2], scale_range, size)
    view = crop(resize_shorter(image, side), top, left, size)
    return view[:, ::-1] if flip else view


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            area_range: tuple[float, float], ratio_range: tuple[float, float],
                            attempts: int = 10) -> tuple[int, int, int, int]:
    """(top, left, box height, box width): a box of a uniform random fraction of the area
    in `area_range` and a log-uniform aspect ratio (width / height) in `ratio_range`, at
    a uniform position (Szegedy et al. 2015, as torchvision). After `attempts` boxes that
    do not fit, the largest centered box whose ratio is within the range."""
    area = height * width
    log_ratios = np.log(ratio_range)
    for _ in range(attempts):
        target = area * rng.uniform(*area_range)
        ratio = np.exp(rng.uniform(*log_ratios))
        box_width = round(np.sqrt(target * ratio))
        box_height = round(np.sqrt(target / ratio))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(rng.integers(0, height - box_height + 1))
            left = int(rng.integers(0, width - box_width + 1))
            return top, left, box_height, box_width
    ratio = width / height
    if ratio < ratio_range[0]:
        box_width, box_height = width, round(width / ratio_range[0])
    elif ratio > ratio_range[1]:
        box_width, box_height = round(height * ratio_range[1]), height
    else:
        box_width, box_height = width, height
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int,
                               area_range: tuple[float, float],
                               ratio_range: tuple[float, float]) -> tuple[int, int, int, int, bool]:
    """(top, left, box height, box width, flip) of one random-resized-crop: the box
    (`random_resized_crop_box`), then the flip, drawn in that order."""
    return (*random_resized_crop_box(rng, height, width, area_range, ratio_range), flip_draw(rng))


def random_resized_crop(rng: np.random.Generator, image: np.ndarray, area_range: tuple[float, float],
                        ratio_range: tuple[float, float], size: int) -> np.ndarray:
    """The modern ImageNet augmentation: a random box (`random_resized_crop_box`) resized
    to `size` x `size`, flipped with p = 1/2."""
    top, left, box_height, box_width, flip = random_resized_crop_params(
        rng, *image.shape[:2], area_range, ratio_range)
    view = _pillow_resize(image, (size, size), box=(left, top, left + box_width, top + box_height))
    return view[:, ::-1] if flip else view


def lighting_offset(rng: np.random.Generator, std: float) -> np.ndarray:
    """AlexNet's PCA colour augmentation: the RGB offset (in [0, 1] pixel units) added to
    every pixel of one image, `eigenvectors @ (alpha * eigenvalues)` with alpha ~ N(0, std)."""
    alpha = rng.normal(0.0, std, 3).astype(np.float32)
    return IMAGENET_EIGENVECTORS @ (alpha * IMAGENET_EIGENVALUES)


def center_crop(image: np.ndarray, resize: int, size: int) -> np.ndarray:
    """Shorter side resized to `resize`, then the center `size` x `size` crop."""
    resized = resize_shorter(image, resize)
    return crop(resized, *five_crop_corners(*resized.shape[:2], size)[-1], size)


def five_crop_corners(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of the top-left, top-right, bottom-left, bottom-right and center `size`
    crops of a height x width image."""
    return [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
            ((height - size) // 2, (width - size) // 2)]


def ten_crops(image: np.ndarray, resize: int, size: int) -> np.ndarray:
    """(10, size, size, C): of the image resized to shorter side `resize`, the top-left,
    top-right, bottom-left, bottom-right and center crops, then the same five flipped."""
    resized = resize_shorter(image, resize)
    corners = five_crop_corners(*resized.shape[:2], size)
    crops = np.stack([crop(resized, top, left, size) for top, left in corners])
    return np.concatenate([crops, crops[:, :, ::-1]])


# Multi-scale testing scores whole images of any shape. To compile a bounded number of
# networks, every image is padded (bottom and right) to the canvas of its aspect bucket:
# the shorter side is the scale's, the longer one `ceil(side * ratio)` for the smallest
# ratio (longer / shorter side) here that holds the image, landscape or portrait. That is
# 1 + 2 * 3 = 7 canvas shapes per scale; images longer than 2:1 are center-cropped to 2:1.
MULTI_SCALE_RATIOS = (1.0, 4 / 3, 3 / 2, 2.0)
# (ratio, portrait) of each bucket; a bucket's images are batched together.
MULTI_SCALE_BUCKETS = ((1.0, False),) + tuple(
    (ratio, portrait) for ratio in MULTI_SCALE_RATIOS[1:] for portrait in (False, True)
)


def multi_scale_bucket(height: int, width: int) -> int:
    """The index in `MULTI_SCALE_BUCKETS` of an image's canvas."""
    ratio = min(max(height, width) / min(height, width), MULTI_SCALE_RATIOS[-1])
    smallest = next(r for r in MULTI_SCALE_RATIOS if ratio <= r)
    return MULTI_SCALE_BUCKETS.index((smallest, smallest > 1.0 and height > width))


def multi_scale_canvas(bucket: int, side: int) -> tuple[int, int]:
    """(height, width) of bucket `bucket`'s canvas at shorter side `side`."""
    ratio, portrait = MULTI_SCALE_BUCKETS[bucket]
    longer = math.ceil(side * ratio)
    return (longer, side) if portrait else (side, longer)


def widest_bucket_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the part of an image that multi-scale testing scores:
    all of it, or its center cut to 2:1 where it is longer."""
    limit = math.floor(min(height, width) * MULTI_SCALE_RATIOS[-1])
    if height > limit:
        return (height - limit) // 2, 0, limit, width
    if width > limit:
        return 0, (width - limit) // 2, height, limit
    return 0, 0, height, width


def multi_scale_views(image: np.ndarray, sizes: tuple[int, ...]) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """The fully-convolutional testing views of an image (Sec. 3.4): for each shorter side s
    in `sizes`, (2, H, W, C) holding the whole image resized to it and its flip, each in
    the top-left corner of its bucket's zero canvas (`multi_scale_canvas`); and the resized
    images' (height, width) per scale, (len(sizes), 2) int32, which say what is image."""
    top, left, height, width = widest_bucket_box(*image.shape[:2])
    image = image[top : top + height, left : left + width]
    bucket = multi_scale_bucket(*image.shape[:2])
    views, valid = [], []
    for side in sizes:
        resized = resize_shorter(image, side)
        height, width = resized.shape[:2]
        canvas_height, canvas_width = multi_scale_canvas(bucket, side)
        padding = ((0, canvas_height - height), (0, canvas_width - width), (0, 0))
        views.append(np.stack([np.pad(resized, padding), np.pad(resized[:, ::-1], padding)]))
        valid.append((height, width))
    return tuple(views), np.asarray(valid, np.int32)
