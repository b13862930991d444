"""Where the examples of small image-classification datasets come from.

A split is loaded whole into host memory as uint8 NHWC images and int32 labels. With a
`data_dir` the datasets' original distribution files are read (IDX for MNIST and
Fashion-MNIST, the python pickles for CIFAR); without one, tensorflow-datasets is used,
imported only then so that `import resnet_jax` stays light.
"""

import contextlib
import dataclasses
import gzip
import io
import os
import pickle
import shutil
import socket
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset, in memory."""

    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int32, (N,)
    num_classes: int


class DataError(ValueError):
    """A dataset that cannot be loaded: the message says where, what is wrong, and the fix."""


_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10}
DATASETS = tuple(_NUM_CLASSES)
# (height, width, channels) of each dataset's images: what a model for it is built for.
IMAGE_SHAPES = {"cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "mnist": (28, 28, 1),
                "fashion_mnist": (28, 28, 1)}


def num_classes(name: str) -> int:
    return _NUM_CLASSES[name]

# The paper's CIFAR-10 protocol (Sec. 4.2): train on 45k, choose on the last 5k of train.
HOLDOUT_VALIDATION_SIZE = 5000
SPLITS = ("train", "test", "holdout_train", "holdout_validation")

_HOW_TO_GET = {
    "mnist": (
        "put the four MNIST files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each plain or .gz) in dataset.data_dir"
    ),
    "fashion_mnist": (
        "`apt-get install -y dataset-fashion-mnist` and pass "
        "dataset.data_dir=/usr/share/datasets/fashion-mnist, or put the four files of the "
        "Fashion-MNIST release (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in dataset.data_dir"
    ),
    "cifar10": (
        "extract the CIFAR-10 python version (cifar-10-python.tar.gz) into dataset.data_dir, "
        "which then holds cifar-10-batches-py/data_batch_1 ... test_batch"
    ),
    "cifar100": (
        "extract the CIFAR-100 python version (cifar-100-python.tar.gz) into dataset.data_dir, "
        "which then holds cifar-100-python/train and cifar-100-python/test"
    ),
}


def load_split(name: str, split: str, data_dir: str | os.PathLike[str] | None = None) -> Split:
    """Loads `split` of dataset `name` into memory.

    `split` is "train", "test", or the paper's holdout of train: "holdout_train" (all but
    the last 5000 examples) and "holdout_validation" (the last 5000). With `data_dir`, the
    original distribution files are read from there; without it, tensorflow-datasets loads
    the split from its own data directory (TFDS_DATA_DIR), preparing it if needed.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    stored_split = "test" if split == "test" else "train"
    if data_dir is None:
        split_data = _load_with_tfds(name, stored_split)
    else:
        split_data = _load_from_files(name, stored_split, Path(data_dir))
    if split.startswith("holdout_"):
        return _holdout(name, split_data, split)
    return split_data


def _holdout(name: str, train: Split, split: str) -> Split:
    num_train = len(train.labels) - HOLDOUT_VALIDATION_SIZE
    if num_train <= 0:
        raise DataError(
            f"{name} train has {len(train.labels)} examples, too few to hold out the last "
            f"{HOLDOUT_VALIDATION_SIZE} for validation"
        )
    part = slice(None, num_train) if split == "holdout_train" else slice(num_train, None)
    # Copies, so that the full train split is not kept alive by a view into it.
    return Split(train.images[part].copy(), train.labels[part].copy(), train.num_classes)


def _checked_split(name: str, images: np.ndarray, labels: np.ndarray, origin: str) -> Split:
    """The one place where every source's arrays are checked against each other."""
    num_classes = _NUM_CLASSES[name]
    if len(images) != len(labels):
        raise _data_error(
            name, origin, f"image/label count mismatch: {len(images)} images, {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise _data_error(
            name,
            origin,
            f"labels span {labels.min()}..{labels.max()}, outside 0..{num_classes - 1}",
        )
    return Split(images, labels.astype(np.int32), num_classes)


def _data_error(name: str, path: Path | str, problem: str) -> DataError:
    return DataError(f"{path}: {problem}. To get {name}: {_HOW_TO_GET[name]}")


def _load_from_files(name: str, split: str, data_dir: Path) -> Split:
    if not data_dir.is_dir():
        raise _data_error(name, data_dir, "no such directory (dataset.data_dir)")
    if name in _CIFAR_LAYOUTS:
        return _read_cifar(name, split, data_dir)
    return _read_idx_split(name, split, data_dir)


# --- MNIST and Fashion-MNIST: IDX files ---------------------------------------------------

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic: two zero bytes, the element type (0x08: unsigned byte), the number of dims.
_IDX_UBYTE = 0x08


def _read_idx_split(name: str, split: str, data_dir: Path) -> Split:
    images_name, labels_name = _IDX_FILES[split]
    images_path = _find_idx_file(name, data_dir, images_name)
    labels_path = _find_idx_file(name, data_dir, labels_name)
    images = _read_idx(name, images_path, ndim=3)[..., np.newaxis]  # grayscale: C = 1
    labels = _read_idx(name, labels_path, ndim=1)
    return _checked_split(name, images, labels, f"{images_path} and {labels_path}")


def _find_idx_file(name: str, data_dir: Path, file_name: str) -> Path:
    candidates = (data_dir / file_name, data_dir / f"{file_name}.gz")
    for path in candidates:
        if path.is_file():
            return path
    raise _data_error(name, candidates[0], f"missing file (nor is there {candidates[1].name})")


def _read_idx(name: str, path: Path, ndim: int) -> np.ndarray:
    raw = _read_bytes(name, path)
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise _data_error(name, path, f"truncated file: {len(raw)} bytes, less than its header")
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = _IDX_UBYTE << 8 | ndim
    if magic != expected_magic:
        raise _data_error(
            name,
            path,
            f"wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(IDX of unsigned bytes with {ndim} dimension(s)); not an IDX file of this kind",
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    declared = int(np.prod(shape))
    actual = len(raw) - header_size
    if actual != declared:
        problem = "truncated file" if actual < declared else "wrong size"
        raise _data_error(
            name,
            path,
            f"{problem}: header declares shape {shape}, {declared} bytes of data, "
            f"the file holds {actual}",
        )
    # A copy: a view of the immutable bytes would be read-only, unlike the other sources'.
    return np.frombuffer(raw, np.uint8, offset=header_size).reshape(shape).copy()


def _read_bytes(name: str, path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            return gzip.decompress(path.read_bytes())
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as error:
        # gzip says EOFError for a truncated stream, BadGzipFile (an OSError) for a bad one.
        raise _data_error(name, path, f"truncated or unreadable file ({error})") from error


# --- CIFAR-10 and CIFAR-100: python pickles -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CifarLayout:
    folder: str  # what the python tarball extracts to
    files: dict[str, tuple[str, ...]]  # split -> batch files
    label_key: bytes


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        label_key=b"labels",
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        files={"train": ("train",), "test": ("test",)},
        label_key=b"fine_labels",
    ),
}
_CIFAR_SIDE = 32
_CIFAR_ROW_SIZE = 3 * _CIFAR_SIDE * _CIFAR_SIDE


def _read_cifar(name: str, split: str, data_dir: Path) -> Split:
    layout = _CIFAR_LAYOUTS[name]
    # data_dir may hold the extracted folder, or be that folder itself.
    folder = data_dir / layout.folder
    if not folder.is_dir():
        folder = data_dir
    batches = [_read_cifar_batch(name, folder / file, layout) for file in layout.files[split]]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return _checked_split(name, images, labels, folder)


def _read_cifar_batch(name: str, path: Path, layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise _data_error(name, path, "missing file")
    try:
        # The batches were pickled by Python 2: its str keys and data come back as bytes.
        batch = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise _data_error(name, path, f"truncated or not a CIFAR batch ({error})") from error
    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        raise _data_error(
            name, path, f"not a CIFAR batch: expected a dict with b'data' and {layout.label_key!r}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[layout.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_ROW_SIZE:
        raise _data_error(
            name,
            path,
            f"wrong shape: data is {data.dtype} {data.shape}, "
            f"expected uint8 (N, {_CIFAR_ROW_SIZE})",
        )
    if labels.ndim != 1 or len(labels) != len(data):
        raise _data_error(
            name,
            path,
            f"image/label count mismatch: {len(data)} images, labels of shape {labels.shape}",
        )
    # Each row holds the red, then the green, then the blue 32x32 plane (CHW); to NHWC.
    images = data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what CIFAR batches hold: a general pickle runs arbitrary code on load."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),  # pickled by numpy 1
            ("numpy._core.multiarray", "_reconstruct"),  # pickled by numpy 2
            ("numpy._core.numeric", "_frombuffer"),  # numpy 2, pickle protocol 5
            ("_codecs", "encode"),  # bytes in a Python 3 pickle of protocol 2
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


# --- tensorflow-datasets ------------------------------------------------------------------


# How long one download host may take to accept a connection before it counts as unreachable.
DOWNLOAD_PROBE_TIMEOUT_S = 10
_OFFLINE_ROUTE = (
    "Without internet, train on Fashion-MNIST from Debian's dataset-fashion-mnist: plain `make train` "
    "(configs/fashion_mnist_resnet20_short.py; it installs the package where it may), or any net with "
    "configs/cifar.py:MODEL,fashion_mnist after `apt-get install -y dataset-fashion-mnist`; or pass "
    "dataset.data_dir with files you have: "
)


def _load_with_tfds(name: str, split: str) -> Split:
    try:
        import tensorflow_datasets as tfds  # heavy, and only this path needs it
    except ImportError as error:
        raise DataError(
            f"loading {name} without dataset.data_dir needs tensorflow-datasets ({error}): "
            f"`pip install tensorflow-datasets`, or pass dataset.data_dir: {_HOW_TO_GET[name]}"
        ) from error
    builder = tfds.builder(name)
    if not builder.is_prepared():
        _check_download_hosts(name, builder.url_infos or {})
    try:
        # Without tensorflow, data_source reads a prepared ArrayRecord copy and decodes its
        # PNGs with pillow; preparing that copy the first time does need tensorflow.
        with _removed_if_it_fails(builder.data_dir_root, name):
            records = list(tfds.data_source(name, split=split))
    except ImportError as error:
        raise DataError(
            f"tensorflow-datasets could not load {name} {split}: module {error.name!r} is missing "
            f"({error}). Decoding needs `pip install pillow`, preparing the dataset the first time "
            f"needs tensorflow (`pip install -e .[tfds,tfds-prepare]`); "
            f"or pass dataset.data_dir: {_HOW_TO_GET[name]}"
        ) from error
    except OSError as error:  # requests' errors are OSErrors too
        raise DataError(
            f"tensorflow-datasets could not download and prepare {name} into "
            f"{builder.data_dir_root}: {type(error).__name__}: {error}. {_OFFLINE_ROUTE}"
            f"{_HOW_TO_GET[name]}"
        ) from error
    images = np.stack([record["image"] for record in records])
    labels = np.array([record["label"] for record in records])
    return _checked_split(name, images, labels, f"tensorflow-datasets {name} {split}")


def _check_download_hosts(name: str, urls: Iterable[str]) -> None:
    """Refuse at once, naming the URL, when a host the dataset downloads from does not answer:
    without a network tensorflow-datasets would retry for minutes, then print a traceback."""
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        try:
            socket.create_connection(address, timeout=DOWNLOAD_PROBE_TIMEOUT_S).close()
        except OSError as error:
            raise DataError(
                f"tensorflow-datasets must download {name} from {url} the first time, and "
                f"{parts.hostname} cannot be reached ({error}). {_OFFLINE_ROUTE}{_HOW_TO_GET[name]}"
            ) from None


@contextlib.contextmanager
def _removed_if_it_fails(data_dir_root: os.PathLike[str], name: str) -> Iterator[None]:
    """What preparing `name` creates under TFDS's data directory, removed if it fails, so
    that no half-made dataset or download is left behind (what was there stays)."""
    root = Path(data_dir_root)
    made_here = [root / name, root / "downloads" / name, root / "downloads" / "extracted",
                 root / "downloads", root]  # the deepest first
    existed = {path for path in made_here if path.exists()}
    try:
        yield
    except BaseException:
        for path in made_here:
            if path not in existed and path.exists():
                shutil.rmtree(path, ignore_errors=True)
        raise
