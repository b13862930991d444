"""Writers of the datasets' original file formats, independent of the code under test."""

import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic 0x0000 08 ndim, big-endian uint32 dims, then the bytes; gzipped for .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    content = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)


def write_mnist(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool):
    prefix = {"train": "train", "test": "t10k"}[split]
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


def graded_images(rng: np.random.Generator, labels: np.ndarray, side: int = 12) -> np.ndarray:
    """Noise over a brightness that grows with the label (classes do not overlap): learnable
    in a few steps."""
    noise = rng.integers(0, 20, (len(labels), side, side))
    return (noise + 25 * labels[:, None, None]).astype(np.uint8)


def write_graded_fashion_mnist(folder: Path, seed: int, train: int, test: int, gz: bool) -> Path:
    """A small learnable dataset in Fashion-MNIST's IDX files: `train` and `test` examples."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        write_mnist(folder, split, graded_images(rng, labels), labels, gz=gz)
    return folder


def write_image_folder(root: Path, seed: int, classes: int = 3, train_per_class: int = 6,
                       val_per_class: int = 3, shape: tuple[int, int] = (40, 52)) -> Path:
    """`root/{train,val}/class_<k>/*`: images in both formats (JPEG and PNG), of class-graded
    brightness (learnable), alternately landscape and portrait, written with Pillow."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                height, width = shape if i % 2 == 0 else shape[::-1]
                pixels = rng.integers(0, 30, (height, width, 3)) + 200 * label // max(classes - 1, 1)
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(folder / (f"{i:03d}.jpg" if i % 2 == 0 else f"{i:03d}.png"))
    return root


# Coordinate images: each pixel holds its own position, x * COORDINATE_STEP in red and
# y * COORDINATE_STEP in green, so a resampled crop says which box of the image it shows.
COORDINATE_STEP = 4


def write_coordinate_folder(root: Path, train: int = 12, val: int = 4,
                            shape: tuple[int, int] = (48, 64)) -> Path:
    """`root/{train,val}/class_<k>/*.png` (two classes, lossless PNG): coordinate images of
    `shape`, alternately landscape and portrait, blue graded by class."""
    from PIL import Image

    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            height, width = shape if i % 2 == 0 else shape[::-1]
            assert max(height, width) * COORDINATE_STEP <= 256, "coordinates must fit in a byte"
            y, x = np.mgrid[0:height, 0:width]
            label = i % 2
            blue = np.full_like(x, 60 + 120 * label)
            pixels = np.stack([x * COORDINATE_STEP, y * COORDINATE_STEP, blue], -1)
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root
