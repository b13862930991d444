"""Large image datasets (ImageNet) as random-access records, read one image at a time.

A record source has `len()`, `source[i] -> (uint8 RGB image (H, W, 3), label)`,
`encoded(i) -> (the image's file bytes, label)` (what the DALI loader decodes itself),
`image_shape(i) -> (H, W)` (multi-scale testing groups images by shape before reading
them), `num_classes` and `describe(i)` (what to name in an error). Sources are picklable, so
the input pipeline's worker processes each get one (an image folder's file list shared,
not copied). Two kinds:

- `ImageFolder`: `data_dir/train/<class>/*` and `data_dir/val/<class>/*` JPEG or PNG
  files; classes are the folder names in sorted order, the same in both splits.
- `TfdsRecords`: a prepared tensorflow-datasets dataset (`imagenet2012`, `imagenette`)
  through `tfds.data_source`, which reads its ArrayRecord files without tensorflow.

Pillow and tensorflow-datasets are imported only by the sources that need them.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from resnet_jax.data.shared_arrays import SharedArrays
from resnet_jax.data.sources import DataError

STREAMED_DATASETS = ("image_folder", "imagenet2012", "imagenette")
# Class counts known before reading any data; image_folder's come from its folders.
STREAMED_NUM_CLASSES = {"imagenet2012": 1000, "imagenette": 10}
STREAM_SPLITS = ("train", "validation")
# The folder of each split in an image folder (ImageNet's own layout names it "val").
IMAGE_FOLDER_SPLITS = {"train": "train", "validation": "val"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

IMAGENET_PREPARATION = (
    "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org, after "
    "registering) into ~/tensorflow_datasets/downloads/manual/, then run once, with "
    "tensorflow installed (pip install -e '.[tfds,tfds-prepare]'): "
    "tfds build imagenet2012 --file_format=array_record"
)


def decode_image(data: bytes, what: str) -> np.ndarray:
    """uint8 RGB (H, W, 3) from JPEG or PNG bytes; grayscale and CMYK become RGB."""
    from PIL import Image, UnidentifiedImageError  # the image sources need pillow, not the rest

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{what}: unreadable image ({type(error).__name__}: {error})") from None


def header_image_shape(file: str | os.PathLike[str] | BinaryIO, what: str) -> tuple[int, int]:
    """(height, width) of a JPEG or PNG (a path or an open file) from its header, without
    reading or decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{what}: unreadable image ({type(error).__name__}: {error})") from None
    return height, width


class ImageFolder:
    """One split of `data_dir/{train,val}/<class>/<image>`: files sorted, classes sorted.

    The file list is held compactly, and shared with the input workers rather than copied
    to each (`shared_arrays`): each class folder's path once, and the file names as one
    byte string with their offsets, mapped read-only by every process that unpickles the
    folder. Pickling one costs O(classes), not O(files): ImageNet's 1.28M paths as a list
    were a 72 MiB copy per worker (benchmarks/RESULTS.md, "Input workers at pod size")."""

    def __init__(self, data_dir: str | os.PathLike[str], split: str, classes: tuple[str, ...] | None = None):
        root = Path(data_dir)
        layout = "dataset.data_dir holding train/<class>/*.jpg and val/<class>/*.jpg (JPEG or PNG)"
        if not root.is_dir():
            raise DataError(f"{root}: no such directory; image_folder needs {layout}")
        folder = root / IMAGE_FOLDER_SPLITS[split]
        if not folder.is_dir():
            raise DataError(f"{folder}: no such directory (the {split} split); image_folder needs {layout}")
        found = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
        if not found:
            raise DataError(f"{folder}: no class folders; image_folder needs {layout}")
        if classes is not None and found != classes:
            extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise DataError(
                f"{folder}: its class folders differ from the training split's "
                f"(only here: {extra or 'none'}; missing here: {missing or 'none'}); both splits "
                "need the same class folders, so that labels mean the same"
            )
        # Names sorted as their paths are (a folder's children compare by name).
        names = [sorted(entry.name for entry in os.scandir(folder / name) if _is_image(entry))
                 for name in found]
        if not any(names):
            raise DataError(f"{folder}: no .jpg, .jpeg or .png files in its class folders; needs {layout}")
        self._hold(folder, found, names)

    @classmethod
    def from_names(cls, folder: str | os.PathLike[str], classes: tuple[str, ...],
                   names: list[list[str]]) -> ImageFolder:
        """The split at `folder` whose class folders are `classes` (sorted) and hold the image
        files `names[label]` (sorted), as given: the folder is not read until an image is."""
        split = cls.__new__(cls)
        split._hold(Path(folder), tuple(classes), names)
        return split

    def _hold(self, folder: Path, classes: tuple[str, ...], names: list[list[str]]) -> None:
        self.classes = classes
        self._class_folders = tuple(str(folder / name) for name in classes)
        self._class_starts = np.cumsum([0, *map(len, names)], dtype=np.int64)
        encoded = [os.fsencode(name) for class_names in names for name in class_names]  # any name, exactly
        self._names = SharedArrays(characters=np.frombuffer(b"".join(encoded), np.uint8),
                                   starts=np.cumsum([0, *map(len, encoded)], dtype=np.int64))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def file_list_nbytes(self) -> int:
        """The bytes of its file names, held once by the process that listed them and mapped by
        the processes that unpickle the folder."""
        return self._names.nbytes

    @property
    def labels(self) -> np.ndarray:
        """Every file's label (int32), in order."""
        return np.repeat(np.arange(self.num_classes, dtype=np.int32), np.diff(self._class_starts))

    def __len__(self) -> int:
        return int(self._class_starts[-1])

    def _label(self, index: int) -> int:
        return int(np.searchsorted(self._class_starts, index, side="right")) - 1

    def describe(self, index: int) -> str:
        """The file's path."""
        index = range(len(self))[index]  # as a list indexes: negative from the end, IndexError past it
        characters, starts = self._names["characters"], self._names["starts"]
        name = os.fsdecode(characters[starts[index]:starts[index + 1]].tobytes())
        return f"{self._class_folders[self._label(index)]}{os.sep}{name}"

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        data, label = self.encoded(index)
        return decode_image(data, self.describe(index)), label

    def encoded(self, index: int) -> tuple[bytes, int]:
        """The file's bytes, undecoded, and its label."""
        index = range(len(self))[index]
        path = self.describe(index)
        try:
            with open(path, "rb") as file:
                return file.read(), self._label(index)
        except OSError as error:
            raise DataError(f"{path}: cannot be read ({error})") from None

    def image_shape(self, index: int) -> tuple[int, int]:
        """(height, width) from the file's header, without decoding the pixels."""
        path = self.describe(index)
        return header_image_shape(path, path)


def _is_image(entry: os.DirEntry) -> bool:
    """A file (or a link to one) with an image suffix, as `Path.suffix` finds it: the name's
    last dot onward, not a dot-file's own name (`.jpg` has no suffix)."""
    name = entry.name.lower()
    return name.endswith(IMAGE_SUFFIXES) and name not in IMAGE_SUFFIXES and entry.is_file()


class TfdsRecords:
    """One split of a prepared TFDS image dataset, read through `tfds.data_source`."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        try:
            import tensorflow_datasets as tfds  # heavy, and only this source needs it
        except ImportError as error:
            raise DataError(
                f"{name} is read through tensorflow-datasets ({error}): pip install -e '.[tfds,stream]'"
            ) from None
        self.name, self.split, self.data_dir = name, split, data_dir
        self.num_classes = STREAMED_NUM_CLASSES[name]
        self._encoded_records = None
        try:
            self.records = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as error:  # noqa: BLE001 - TFDS raises many kinds; all mean "not prepared"
            how = IMAGENET_PREPARATION if name == "imagenet2012" else (
                f"run once, with tensorflow installed: tfds build {name} --file_format=array_record"
            )
            raise DataError(
                f"tensorflow-datasets {name} {split} is not available ({type(error).__name__}: "
                f"{str(error)[:300]}). To get it: {how}"
            ) from None

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, index: int) -> str:
        return f"tensorflow-datasets {self.name} {self.split} record {index}"

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            record = self.records[index]
        except Exception as error:  # noqa: BLE001 - a damaged record: name it, whatever broke
            raise DataError(f"{self.describe(index)}: unreadable ({type(error).__name__}: {error})") from None
        image = np.asarray(record["image"])
        if image.ndim == 2 or image.shape[-1] == 1:
            image = np.broadcast_to(image.reshape(*image.shape[:2], 1), (*image.shape[:2], 3))
        return np.ascontiguousarray(image, np.uint8), int(record["label"])

    def image_shape(self, index: int) -> tuple[int, int]:
        """(height, width), decoding the record (TFDS stores no size beside the image)."""
        return self[index][0].shape[:2]

    def encoded(self, index: int) -> tuple[bytes, int]:
        """The record's image as stored (ImageNet's JPEG), undecoded, and its label."""
        if self._encoded_records is None:  # a second view of the same files, opened on first use
            import tensorflow_datasets as tfds

            self._encoded_records = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                                     decoders={"image": tfds.decode.SkipDecoding()})
        try:
            record = self._encoded_records[index]
        except Exception as error:  # noqa: BLE001 - a damaged record: name it, whatever broke
            raise DataError(f"{self.describe(index)}: unreadable ({type(error).__name__}: {error})") from None
        return bytes(record["image"]), int(record["label"])


def open_split(name: str, split: str, data_dir: str | None, classes: tuple[str, ...] | None = None):
    """The record source of `split` of streamed dataset `name`. For image_folder, `classes`
    (the training split's) must equal the split's own class folders."""
    if name == "image_folder":
        return ImageFolder(data_dir, split, classes)
    return TfdsRecords(name, split, data_dir or None)


def open_splits(dataset, roles: tuple[str, ...]) -> tuple:
    """(training split, evaluation split or None without the "eval" role) of the streamed
    dataset `dataset` (a config's `dataset`), the evaluation split with the training
    split's class folders."""
    data_dir = dataset.data_dir or None
    train = open_split(dataset.name, dataset.train_split, data_dir)
    if "eval" not in roles:
        return train, None
    return train, open_split(dataset.name, dataset.eval_split, data_dir, getattr(train, "classes", None))
