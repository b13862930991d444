"""Tests of resnet_jax.data.sources on files written here in the datasets' original formats."""

import gzip
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resnet_jax.data.sources import DATASETS, DataError, load_split
from tests.fake_data import write_idx, write_mnist

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- writers of the original formats, independent of the code under test ------------------


def numbered_images(count: int, side: int) -> np.ndarray:
    """Images whose first two pixels spell their index, so every image is distinct."""
    images = np.zeros((count, side, side), np.uint8)
    images[:, 0, 0] = np.arange(count) % 256
    images[:, 0, 1] = np.arange(count) // 256
    return images


def cifar_pickle(data: np.ndarray, labels, label_key: bytes, numpy1: bool = False) -> bytes:
    # Labels as Python ints, as in the released files.
    batch = {b"batch_label": b"testing batch", b"data": data, label_key: [int(x) for x in labels]}
    if numpy1:
        # As the released files: protocol 2, arrays reconstructed through numpy.core.
        return pickle.dumps(batch, protocol=2).replace(
            b"numpy._core.multiarray", b"numpy.core.multiarray"
        )
    return pickle.dumps(batch, protocol=5)


def cifar_rows(images_nhwc: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072): the red plane, then green, then blue, each row-major."""
    return images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1)


def random_images(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def write_cifar10(folder: Path, rng: np.random.Generator, per_batch: int = 3):
    """Writes cifar-10-batches-py/ under folder; returns {split: (images, labels)}."""
    batches = folder / "cifar-10-batches-py"
    batches.mkdir()
    written = {}
    for split, files in {
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
    }.items():
        images = random_images(rng, per_batch * len(files))
        labels = rng.integers(0, 10, len(images))
        for i, file in enumerate(files):
            part = slice(i * per_batch, (i + 1) * per_batch)
            content = cifar_pickle(cifar_rows(images[part]), labels[part], b"labels")
            (batches / file).write_bytes(content)
        written[split] = images, labels
    return written


# --- MNIST and Fashion-MNIST ---------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_round_trip(tmp_path, gz, split):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 7, 1], np.uint8)
    write_mnist(tmp_path, split, images, labels, gz=gz)
    loaded = load_split("mnist", split, tmp_path)
    assert loaded.images.dtype == np.uint8 and loaded.images.shape == (6, 28, 28, 1)
    assert loaded.images.flags.writeable
    np.testing.assert_array_equal(loaded.images[..., 0], images)
    assert loaded.labels.dtype == np.int32
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.num_classes == 10


def test_idx_non_square_images_keep_height_then_width(tmp_path):
    images = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_mnist(tmp_path, "test", images, np.array([1, 2], np.uint8), gz=True)
    loaded = load_split("fashion_mnist", "test", tmp_path)
    np.testing.assert_array_equal(loaded.images[..., 0], images)


def test_holdout_splits_partition_train(tmp_path):
    images = numbered_images(5007, side=2)
    labels = np.arange(5007, dtype=np.uint8) % 10
    write_mnist(tmp_path, "train", images, labels, gz=False)
    train = load_split("mnist", "train", tmp_path)
    holdout_train = load_split("mnist", "holdout_train", tmp_path)
    holdout_validation = load_split("mnist", "holdout_validation", tmp_path)
    assert len(holdout_train.labels) == 7 and len(holdout_validation.labels) == 5000
    assert len(holdout_train.images) == 7 and len(holdout_validation.images) == 5000
    ids = {tuple(image[0, :2, 0]) for image in holdout_train.images}
    assert ids.isdisjoint(tuple(image[0, :2, 0]) for image in holdout_validation.images)
    np.testing.assert_array_equal(
        np.concatenate([holdout_train.images, holdout_validation.images]), train.images
    )
    np.testing.assert_array_equal(
        np.concatenate([holdout_train.labels, holdout_validation.labels]), train.labels
    )


def test_holdout_of_a_train_split_too_small_is_an_error(tmp_path):
    write_mnist(tmp_path, "train", numbered_images(5000, 2), np.zeros(5000, np.uint8), gz=False)
    with pytest.raises(DataError, match="5000 examples, too few"):
        load_split("mnist", "holdout_validation", tmp_path)


def broken_idx_cases():
    """(name, file to write, its bytes, words the message must hold); labels are fine."""
    images = numbered_images(4, side=3)
    plain = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (4, 3, 3))
    plain += images.tobytes()
    return {
        "truncated": ("train-images-idx3-ubyte", plain[:-5], "truncated file"),
        "truncated_header": ("train-images-idx3-ubyte", plain[:9], "truncated file"),
        "truncated_gzip": ("train-images-idx3-ubyte.gz", gzip.compress(plain)[:-20], "truncated"),
        "trailing_bytes": ("train-images-idx3-ubyte", plain + b"\0", "wrong size"),
        "wrong_magic": ("train-images-idx3-ubyte", b"\0\0\x08\x01" + plain[4:], "magic number"),
        "not_gzip": ("train-images-idx3-ubyte.gz", plain, "unreadable"),
    }


@pytest.mark.parametrize("case", list(broken_idx_cases()))
def test_broken_idx_file_is_a_data_error_naming_path_and_problem(tmp_path, case):
    file_name, content, problem = broken_idx_cases()[case]
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    (tmp_path / file_name).write_bytes(content)
    with pytest.raises(DataError) as raised:
        load_split("fashion_mnist", "train", tmp_path)
    message = str(raised.value)
    assert str(tmp_path / file_name) in message and problem in message
    assert "apt-get install -y dataset-fashion-mnist" in message


def test_idx_count_mismatch(tmp_path):
    write_mnist(tmp_path, "test", numbered_images(4, 2), np.zeros(3, np.uint8), gz=True)
    with pytest.raises(DataError, match="count mismatch: 4 images, 3 labels") as raised:
        load_split("mnist", "test", tmp_path)
    assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in str(raised.value)


def test_idx_label_out_of_range(tmp_path):
    write_mnist(tmp_path, "test", numbered_images(2, 2), np.array([3, 10], np.uint8), gz=True)
    with pytest.raises(DataError, match=r"labels span 3\.\.10, outside 0\.\.9"):
        load_split("mnist", "test", tmp_path)


def test_idx_missing_file_names_path_and_how_to_get_it(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", numbered_images(2, 2))
    with pytest.raises(DataError) as raised:
        load_split("mnist", "test", tmp_path)
    message = str(raised.value)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in message and "missing file" in message
    assert "t10k-labels-idx1-ubyte.gz" in message and "dataset.data_dir" in message


def test_data_dir_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match="no such directory") as raised:
        load_split("cifar10", "train", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(raised.value)


@pytest.mark.fashion_mnist
@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason="Debian's Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist():
    for split, count in (("train", 60000), ("test", 10000)):
        loaded = load_split("fashion_mnist", split, DEBIAN_FASHION_MNIST)
        assert loaded.images.shape == (count, 28, 28, 1) and loaded.images.dtype == np.uint8
        assert loaded.labels.shape == (count,)
        # Fashion-MNIST is balanced: every one of the 10 classes has a tenth of each split.
        np.testing.assert_array_equal(np.bincount(loaded.labels), [count // 10] * 10)
        assert 0 < loaded.images.mean() < 255


# --- CIFAR ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_round_trip(tmp_path, split):
    images, labels = write_cifar10(tmp_path, np.random.default_rng(1))[split]
    loaded = load_split("cifar10", split, tmp_path)
    assert loaded.images.dtype == np.uint8 and loaded.images.shape == (len(images), 32, 32, 3)
    np.testing.assert_array_equal(loaded.images, images)
    assert loaded.labels.dtype == np.int32
    np.testing.assert_array_equal(loaded.labels, labels)
    assert loaded.num_classes == 10


def test_cifar10_data_dir_may_be_the_batches_folder(tmp_path):
    images, labels = write_cifar10(tmp_path, np.random.default_rng(2))["test"]
    loaded = load_split("cifar10", "test", tmp_path / "cifar-10-batches-py")
    np.testing.assert_array_equal(loaded.images, images)
    np.testing.assert_array_equal(loaded.labels, labels)


def test_cifar_rows_are_red_green_blue_planes(tmp_path):
    """Builds the row by hand, so that layout errors cannot cancel out with the writer's."""
    red, green, blue = (np.zeros((32, 32), np.uint8) for _ in range(3))
    red[0, 1] = 11  # row 0, column 1
    green[2, 0] = 22  # row 2, column 0
    blue[31, 30] = 33
    row = np.concatenate([red.ravel(), green.ravel(), blue.ravel()])[np.newaxis]
    (tmp_path / "test_batch").write_bytes(cifar_pickle(row, [4], b"labels"))
    image = load_split("cifar10", "test", tmp_path).images[0]
    assert image[0, 1, 0] == 11 and image[2, 0, 1] == 22 and image[31, 30, 2] == 33
    assert image.sum() == 11 + 22 + 33


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2_protocol5", "numpy1_protocol2"])
def test_cifar100_round_trip_with_fine_labels(tmp_path, numpy1):
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    written = {}
    for split in ("train", "test"):
        images, labels = random_images(rng, 4), np.array([0, 99, 50, 7])
        content = cifar_pickle(cifar_rows(images), labels, b"fine_labels", numpy1=numpy1)
        (folder / split).write_bytes(content)
        written[split] = images, labels
    for split, (images, labels) in written.items():
        loaded = load_split("cifar100", split, tmp_path)
        np.testing.assert_array_equal(loaded.images, images)
        np.testing.assert_array_equal(loaded.labels, labels)
        assert loaded.num_classes == 100


def test_cifar_missing_batch(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(4))
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(DataError) as raised:
        load_split("cifar10", "train", tmp_path)
    message = str(raised.value)
    assert str(missing) in message and "missing file" in message
    assert "cifar-10-python.tar.gz" in message


def test_cifar_truncated_pickle(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(5))
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated") as raised:
        load_split("cifar10", "test", tmp_path)
    assert str(batch) in str(raised.value)


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return os.getcwd, ()

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": RunsCode()}))
    with pytest.raises(DataError, match="refusing to load"):
        load_split("cifar10", "test", tmp_path)


@pytest.mark.parametrize(
    "data", [np.zeros((2, 3000), np.uint8), np.zeros((2, 3072), np.int64)], ids=["width", "dtype"]
)
def test_cifar_wrong_shape(tmp_path, data):
    (tmp_path / "test_batch").write_bytes(cifar_pickle(data, [0, 1], b"labels"))
    with pytest.raises(DataError, match=r"wrong shape.*expected uint8 \(N, 3072\)") as raised:
        load_split("cifar10", "test", tmp_path)
    assert str(tmp_path / "test_batch") in str(raised.value)


def test_cifar_label_count_mismatch(tmp_path):
    (tmp_path / "test_batch").write_bytes(
        cifar_pickle(np.zeros((3, 3072), np.uint8), [0, 1], b"labels")
    )
    with pytest.raises(DataError, match="count mismatch: 3 images") as raised:
        load_split("cifar10", "test", tmp_path)
    assert str(tmp_path / "test_batch") in str(raised.value)


def test_cifar100_batch_without_fine_labels(tmp_path):
    (tmp_path / "test").write_bytes(cifar_pickle(np.zeros((1, 3072), np.uint8), [0], b"labels"))
    with pytest.raises(DataError, match="fine_labels"):
        load_split("cifar100", "test", tmp_path)


# --- names -----------------------------------------------------------------------------------


def test_unknown_dataset_names_it_and_the_accepted_ones():
    with pytest.raises(DataError, match="'imagenet'") as raised:
        load_split("imagenet", "train", "/nowhere")
    assert all(name in str(raised.value) for name in DATASETS)


def test_unknown_split_names_it_and_the_accepted_ones():
    with pytest.raises(DataError, match=r"'train\[:45000\]'.*holdout_validation"):
        load_split("cifar10", "train[:45000]", "/nowhere")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# --- tensorflow-datasets -----------------------------------------------------------------


def test_without_tfds_installed_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    with pytest.raises(DataError, match="pip install tensorflow-datasets") as raised:
        load_split("cifar10", "train")
    assert "dataset.data_dir" in str(raised.value)


def test_importing_sources_does_not_import_tfds():
    code = "import resnet_jax.data.sources, sys; print('tensorflow_datasets' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.tfds
@pytest.mark.parametrize(
    ("name", "shape", "num_classes"),
    [
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
        ("mnist", (28, 28, 1), 10),
        ("fashion_mnist", (28, 28, 1), 10),
    ],
)
def test_tfds_data_source_with_mock_data(name, shape, num_classes, monkeypatch):
    """Run where tensorflow-datasets is installed without tensorflow, this also shows that
    the data_source path needs no tensorflow."""
    import tensorflow_datasets as tfds

    # mock_data serves records but leaves the builder unprepared; a prepared dataset needs
    # no download, and this test reads one.
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    with tfds.testing.mock_data(num_examples=6):
        expected = list(tfds.data_source(name, split="test"))
        loaded = load_split(name, "test")
    assert loaded.images.dtype == np.uint8 and loaded.images.shape == (6, *shape)
    assert loaded.labels.dtype == np.int32 and loaded.num_classes == num_classes
    np.testing.assert_array_equal(loaded.images, [record["image"] for record in expected])
    np.testing.assert_array_equal(loaded.labels, [record["label"] for record in expected])



# train.py on a machine without a network: every host name fails to resolve.
OFFLINE_TRAIN_PY = """
import runpy, socket, sys

def no_network(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

socket.getaddrinfo = no_network
sys.argv = ["train.py", "--config=configs/cifar10_resnet20.py", "--workdir=" + sys.argv[1]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.tfds
def test_train_py_offline_stops_at_once_with_one_paragraph_naming_the_download(tmp_path):
    tfds_dir, workdir = tmp_path / "tensorflow_datasets", tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_TRAIN_PY, str(workdir)], capture_output=True, text=True,
        cwd=REPO_ROOT, env={**os.environ, "TFDS_DATA_DIR": str(tfds_dir)}, timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    [message] = out.stderr.strip().splitlines()  # one paragraph, no traceback
    assert message.startswith(
        "error: tensorflow-datasets must download cifar10 from "
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz the first time"
    )
    assert "cannot be reached" in message and "Name or service not known" in message
    assert "apt-get install -y dataset-fashion-mnist" in message and "configs/fashion_mnist_" in message
    assert "plain `make train`" in message  # the offline run, which installs it where it may
    assert "cifar-10-batches-py" in message  # what dataset.data_dir would need
    assert not workdir.exists()
    assert not tfds_dir.exists() or not list(tfds_dir.iterdir())  # nothing half-made


@pytest.mark.tfds
def test_a_failed_download_leaves_nothing_half_made_and_says_what_failed(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import constants

    from resnet_jax.data import sources

    def fail_midway(builder, *args, **kwargs):
        assert builder.data_dir_root == tmp_path
        partial = builder.data_dir_root / "downloads" / builder.name / "part.tmp"
        partial.parent.mkdir(parents=True)
        partial.write_bytes(b"half")
        raise ConnectionResetError(104, "Connection reset by peer")

    kept = tmp_path / "downloads" / "manual" / "yours.tar"  # what was there stays
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"")
    monkeypatch.setattr(constants, "DATA_DIR", str(tmp_path))  # TFDS_DATA_DIR, read at import
    monkeypatch.setattr(sources.socket, "create_connection", lambda *args, **kwargs: socket.socket())
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail_midway)
    with pytest.raises(DataError, match=r"could not download and prepare cifar100 .*Connection reset"):
        load_split("cifar100", "test")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "downloads", "downloads/manual", "downloads/manual/yours.tar"
    ]
