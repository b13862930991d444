"""The DALI loader (`dataset.loader = "dali"`) on the CPU, where CI runs it: a run trains,
checkpoints, resumes exactly and evaluates in the paper's three modes through it; and it
agrees with the Grain path on the same folder, example for example: the same records,
labels and lighting, crops of the same boxes (hence sizes), the same per-pixel mean, and
the same error for a model scored through either.

The tolerances, all on the CPU, where both decode with libjpeg-turbo (on a GPU nvJPEG
decodes, which no test here can compare), in levels of 255: a pixel
of a view differs by at most 2 between the loaders (measured: 1, Pillow's and DALI's linear
filters rounding differently), a pixel of a mean image (the per-pixel mean of the sample,
or of a batch of crops) by at most 1 (measured: 0.44 over 18 center crops, 0.1 over 40
training crops), all pixels on average by at most 0.25 (measured: DALI's views 0.12
darker); a crop's box by at most 0.25 pixels (measured: 0); a model's error by at most
one image of the set, its loss by 0.1% (measured: the same errors, losses within 0.02%).
"""

import io
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint
from resnet_jax.config import imagenet_recipe
from resnet_jax.data import dali, dali_feed, image_records, stream
from resnet_jax.data.sources import DataError
from resnet_jax.evaluate import evaluate_workdir
from resnet_jax.parallel import data_parallel
from resnet_jax.train import train_and_evaluate
from tests.fake_data import COORDINATE_STEP, write_coordinate_folder, write_image_folder
from tests.test_imagenet import REPO_ROOT, SMALL_SIZES, metrics_lines, small_config
from tests.test_multihost import assert_multi_scale_evaluation_alike, finish, launch, launch_two, lines
from tests.test_reliability import (
    assert_same_run,
    await_group_exit,
    final_state,
    preempted_step,
    streamed_command,
)

# Levels (of 255) by which the loaders' views may differ: a pixel, a pixel of a mean image,
# and all pixels on average.
PIXEL_TOLERANCE, MEAN_IMAGE_TOLERANCE, BIAS_TOLERANCE = 2, 1, 0.25
# Pixels by which the boxes behind the same crop may differ.
BOX_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), seed=1)  # 3 classes x (6 train, 3 val)


def dali_config(data_dir, **changes):
    config = small_config(data_dir=data_dir, **changes)
    config.dataset.loader = "dali"
    return config


def loader_config(data_dir, loader, **dataset):
    config = imagenet_recipe("resnet8", "image_folder")
    config.dataset.data_dir = str(data_dir)
    config.dataset.update(dict(SMALL_SIZES, num_workers=0, prefetch_batches=1, loader=loader))
    config.dataset.update(dataset)
    config.batch_size, config.eval_batch_size, config.num_train_steps = 8, 4, 100
    return config


def opened(config, roles=("train",)):
    kind = dali.DaliData if config.dataset.loader == "dali" else stream.StreamedData
    return kind(config, data_parallel(), roles)


def training_batches(data, start, count):
    with data.train_batches(start) as batches:
        return [jax.tree_util.tree_map(np.asarray, next(batches).batch) for _ in range(count)]


# --- Without DALI: the refusal, and the host's plan (numpy only) ---------------------------

REFUSED_RUN = """
import runpy, sys
sys.modules["nvidia.dali"] = None  # as where DALI is not installed: importing it fails
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_loader_dali_without_dali_is_one_paragraph_naming_the_install_command_before_compiling(
        folder, tmp_path):
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", REFUSED_RUN, "--config=configs/imagenet.py:resnet18", f"--workdir={workdir}",
         "--config.dataset.name=image_folder", f"--config.dataset.data_dir={folder}",
         "--config.dataset.loader=dali"],
        cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-3000:]
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: dataset.loader = 'dali' needs NVIDIA DALI, which cannot be imported here")
    assert "pip install -e '.[dali]'" in line and line.endswith(
        "--config.dataset.loader=grain (evaluate.py: --loader=grain)")
    assert "compiling" not in out.stdout and not workdir.exists()


@pytest.mark.parametrize("mode, save", [
    ("RGB", dict(format="JPEG")), ("L", dict(format="JPEG")), ("CMYK", dict(format="JPEG")),
    ("RGB", dict(format="JPEG", progressive=True)),
    ("RGB", dict(format="JPEG", exif=b"Exif\x00\x00" + bytes(40))), ("RGB", dict(format="PNG")),
    ("L", dict(format="PNG")), ("RGBA", dict(format="PNG")),
])
def test_image_sizes_are_read_from_the_header_of_a_complete_jpeg_or_png(mode, save):
    from PIL import Image

    encoded = io.BytesIO()
    Image.new(mode, (37, 23)).save(encoded, **save)
    data = encoded.getvalue()
    assert dali_feed.encoded_image_shape(data, "image") == (23, 37)
    assert dali_feed.encoded_image_shape(data + bytes(100), "image") == (23, 37)  # padded: still whole
    if save["format"] == "JPEG":  # bytes between two segments, which Pillow reads past
        assert dali_feed.encoded_image_shape(data[:20] + bytes(2) + data[20:], "image") == (23, 37)
    with pytest.raises(DataError, match=r"^image: unreadable image \(a (JPEG|PNG) without its .*cut short"):
        dali_feed.encoded_image_shape(data[:-12], "image")  # as a download or copy cut short
    with pytest.raises(DataError, match=r"^image: unreadable image"):
        dali_feed.encoded_image_shape(data[:12], "image")


@pytest.mark.parametrize("save", [dict(format="BMP"), dict(format="GIF"), dict(format="WEBP")])
def test_other_formats_are_unreadable_images_for_the_dali_loader(save):
    from PIL import Image

    encoded = io.BytesIO()
    Image.new("RGB", (37, 23)).save(encoded, **save)
    with pytest.raises(DataError, match=r"^image: unreadable image \(neither JPEG nor PNG: it begins b'"):
        dali_feed.encoded_image_shape(encoded.getvalue(), "image")


def test_dali_decodes_on_gpus_and_the_cpu_and_refuses_tpus():
    assert (dali.decoder_device("gpu"), dali.decoder_device("cpu")) == ("mixed", "cpu")
    with pytest.raises(DataError, match=r"devices are TPUs: on them the host pipeline is the loader, "
                                        r"--config\.dataset\.loader=grain \(evaluate\.py: --loader=grain\)"):
        dali.decoder_device("tpu")


class RecordingFolder(image_records.ImageFolder):
    """An image folder that notes which records are read, decoded or not."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = []

    def encoded(self, index):
        self.read.append(index)
        return super().encoded(index)


def test_the_feed_draws_the_grain_paths_records_labels_and_lighting(folder):
    settings = stream._Settings.of(loader_config(folder, "dali"))
    positions = stream._Positions(8, 0, 1)
    sources = RecordingFolder(folder, "train"), RecordingFolder(folder, "train")
    feed = dali_feed.TrainFeed(sources[0], settings, positions, start_step=0)
    grain = stream._TrainExample(sources[1], settings, positions)
    for local in range(24):  # across the 18-image epoch
        encoded, *_, label, lighting = feed.sample(local)
        example = grain(local)
        assert label == example["label"]
        np.testing.assert_array_equal(lighting, example["lighting"])
        assert encoded.tobytes() == sources[0].encoded(sources[0].read[-1])[0]
    assert sources[0].read[::2] == sources[1].read and len(set(sources[1].read)) == 18


def test_devices_shares_of_a_batch_make_up_the_batch(folder):
    settings = stream._Settings.of(loader_config(folder, "dali"))
    train = image_records.ImageFolder(folder, "train")
    whole = dali_feed.TrainFeed(train, settings, stream._Positions(8, 0, 1), start_step=3)
    halves = [dali_feed.TrainFeed(train, settings, stream._Positions(8, d, 2), start_step=3) for d in (0, 1)]

    class Info:
        iteration = 1  # step 4

    expected = whole(Info())
    got = [half(Info()) for half in halves]
    for column, name in enumerate(dali_feed.TrainFeed.OUTPUTS):
        joined = got[0][column] + got[1][column]
        assert len(joined) == 8, name
        for a, b in zip(expected[column], joined, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)


# --- Through DALI, on the CPU ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dali_run(folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dali_run")
    return workdir, train_and_evaluate(dali_config(folder), workdir)


@pytest.mark.dali
def test_a_dali_run_trains_checkpoints_and_evaluates_in_every_mode(dali_run):
    workdir, result = dali_run
    saved = checkpoint.read_config(workdir)
    assert saved.dataset.loader == "dali" and saved.dataset.num_classes == 3
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]
    assert sum("eval_error" in line for line in metrics_lines(workdir)) == 2
    center = evaluate_workdir(workdir, mode="center")
    assert center["num_examples"] == 9 and center["step"] == 4
    assert (center["error"], center["top5_error"], center["loss"]) == (
        result["eval_error"], result["eval_top5_error"], result["eval_loss"])
    in_twos = evaluate_workdir(workdir, mode="center", eval_batch_size=2)  # the last batch padded
    assert in_twos["num_examples"] == 9 and in_twos["error"] == center["error"]
    np.testing.assert_allclose(in_twos["loss"], center["loss"], rtol=1e-6)
    for mode in ("ten_crop", "multi_scale"):
        scored = evaluate_workdir(workdir, mode=mode)
        assert scored["mode"] == mode and scored["num_examples"] == 9
        assert 0 <= scored["top5_error"] <= scored["error"] <= 1 and np.isfinite(scored["loss"])
        assert scored["loss"] != center["loss"]  # other views, other scores


@pytest.mark.dali
def test_a_dali_run_resumed_mid_epoch_ends_identical_to_an_uninterrupted_one(dali_run, folder, tmp_path,
                                                                              capsys):
    reference, _ = dali_run
    workdir = tmp_path / "run"
    train_and_evaluate(dali_config(folder), workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")  # killed after step 2 (of an 18-image epoch)
    capsys.readouterr()
    train_and_evaluate(dali_config(folder), workdir)
    assert "resuming at step 2" in capsys.readouterr().out
    assert metrics_lines(workdir) == metrics_lines(reference)
    _, resumed, _ = checkpoint.load(workdir)
    _, uninterrupted, _ = checkpoint.load(reference)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, uninterrupted)


@pytest.mark.dali
def test_training_batches_are_a_function_of_seed_and_step(folder):
    data = opened(loader_config(folder, "dali"))
    uninterrupted = training_batches(data, 0, 4)  # 32 examples: across the 18-image epoch
    resumed = training_batches(data, 2, 2)  # new pipelines, started mid-epoch at step 2
    for a, b in zip(uninterrupted[2:], resumed, strict=True):
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(uninterrupted[0]["image"], uninterrupted[1]["image"])


@pytest.mark.dali
@pytest.mark.parametrize("name, damage", [
    ("002.jpg", lambda data: b"not a jpeg"),
    ("002.jpg", lambda data: data[:len(data) // 2]),  # cut short: DALI's decoder would crash on it
    ("001.png", lambda data: data[:len(data) // 2]),
])
def test_an_unreadable_image_is_an_error_naming_it_or_skipped_and_counted(folder, tmp_path, capsys, name,
                                                                          damage):
    root = shutil.copytree(folder, tmp_path / "copy")
    broken = root / "train" / "class_1" / name
    broken.write_bytes(damage(broken.read_bytes()))
    with pytest.raises(DataError, match=rf"{broken}: unreadable image"):
        opened(loader_config(root, "dali", augment="none"))
    data = opened(loader_config(root, "dali", augment="none", skip_unreadable=True))
    labels = np.concatenate([batch["label"] for batch in training_batches(data, 0, 3)])  # 24: every file
    assert np.sum(labels == 1) > 0 and len(labels) == 24
    err = capsys.readouterr().err
    assert f"skipped unreadable image ({broken}: unreadable image" in err


DEVICES_RUN = """
import sys
import numpy as np
from tests.test_dali import loader_config, opened, training_batches
import jax
data = opened(loader_config(sys.argv[1], "dali"))
batch = training_batches(data, 3, 1)[0]
np.savez(sys.argv[2], devices=jax.device_count(), **batch)
"""


@pytest.mark.dali
def test_one_pipeline_per_device_gives_the_batch_of_one_device(folder, tmp_path):
    one = training_batches(opened(loader_config(folder, "dali")), 3, 1)[0]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", DEVICES_RUN, str(folder), str(tmp_path / "two.npz")],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    two = np.load(tmp_path / "two.npz")
    assert two["devices"] == 2
    for name, value in one.items():
        np.testing.assert_array_equal(two[name], value, err_msg=name)


# --- DALI beside Grain on the same folder ---------------------------------------------------


def assert_views_agree(grain: np.ndarray, dali_views: np.ndarray) -> None:
    difference = dali_views.astype(np.float64) - grain
    assert np.abs(difference).max() <= PIXEL_TOLERANCE
    assert np.abs(difference.mean(axis=0)).max() <= MEAN_IMAGE_TOLERANCE
    assert abs(difference.mean()) <= BIAS_TOLERANCE


@pytest.mark.dali
@pytest.mark.grain
@pytest.mark.parametrize("augment", ["scale_crop_flip", "random_resized_crop"])
def test_the_loaders_feed_the_same_examples_labels_lighting_and_views(folder, augment):
    batches = {loader: training_batches(opened(loader_config(folder, loader, augment=augment)), 0, 5)
               for loader in ("grain", "dali")}  # 40 examples: into the third epoch
    for grain, dali_batch in zip(batches["grain"], batches["dali"], strict=True):
        np.testing.assert_array_equal(grain["label"], dali_batch["label"])
        np.testing.assert_array_equal(grain["lighting"], dali_batch["lighting"])
    assert_views_agree(*(np.concatenate([b["image"] for b in batches[name]]) for name in ("grain", "dali")))


def box_extents(crops: np.ndarray) -> np.ndarray:
    """(N, 2): the height and width, in the image's pixels, of the box each crop of a
    coordinate image shows: from the slope of the coordinates across its middle half."""
    size = crops.shape[1]
    middle = np.arange(size // 4, 3 * size // 4)
    pixels = crops.astype(np.float64)
    across_x = pixels[..., 0][:, :, middle].mean(axis=1)  # x coordinate by column, (N, len(middle))
    across_y = pixels[..., 1][:, middle, :].mean(axis=2)
    slopes = [np.polyfit(middle, values.T, 1)[0] for values in (across_y, across_x)]
    return np.abs(np.stack(slopes, axis=1)) * size / COORDINATE_STEP


@pytest.mark.dali
@pytest.mark.grain
@pytest.mark.parametrize("augment, sides", [
    ("scale_crop_flip", (16 * 48 / 32, 16 * 48 / 20)),  # the 16 crop of a shorter side in [20, 32]
    ("random_resized_crop", ((0.08 * 48 * 64 * 3 / 4) ** 0.5, 48)),  # 8-100% of the area, 3/4-4/3
])
def test_the_loaders_crops_have_the_same_size_distribution(tmp_path, augment, sides):
    coordinates = write_coordinate_folder(tmp_path, train=40)  # 48 x 64 and 64 x 48
    crops = {}
    for loader in ("grain", "dali"):
        data = opened(loader_config(coordinates, loader, augment=augment, scale_range=(20, 32)))
        crops[loader] = np.concatenate([batch["image"] for batch in training_batches(data, 0, 25)])
    extents = {loader: box_extents(views) for loader, views in crops.items()}
    np.testing.assert_allclose(extents["dali"], extents["grain"], atol=BOX_TOLERANCE)
    np.testing.assert_allclose(np.sort(extents["dali"], axis=0), np.sort(extents["grain"], axis=0),
                               atol=BOX_TOLERANCE)
    shorter = extents["grain"].min(axis=1)
    assert sides[0] - 1 <= shorter.min() and shorter.max() <= sides[1] + 1  # the recipe's range ...
    assert shorter.max() - shorter.min() > (sides[1] - sides[0]) / 2  # ... and spread over it
    assert_views_agree(crops["grain"], crops["dali"])


@pytest.mark.dali
@pytest.mark.grain
@pytest.mark.parametrize("normalization", ["per_pixel_mean", "per_channel_mean_std"])
def test_the_loaders_normalisation_statistics_agree(folder, normalization):
    grain, dali_stats = (opened(loader_config(folder, loader, normalization=normalization)).normalization
                         for loader in ("grain", "dali"))
    mean_difference = (np.asarray(dali_stats.mean) - np.asarray(grain.mean)) * 255
    assert np.abs(mean_difference).max() <= MEAN_IMAGE_TOLERANCE
    assert abs(mean_difference.mean()) <= BIAS_TOLERANCE
    np.testing.assert_allclose(np.asarray(dali_stats.std), np.asarray(grain.std), rtol=0.01)


@pytest.mark.dali
@pytest.mark.grain
@pytest.mark.parametrize("mode", ["center", "ten_crop", "multi_scale"])
def test_a_model_scores_the_same_error_through_either_loader(dali_run, tmp_path, mode):
    workdir, _ = dali_run
    # The run's 3 classes at brightness 0, 50 and 100 of 255, where it learned 0, 100 and 200:
    # scores between its classes, an error neither 0 nor 1.
    other = write_image_folder(tmp_path, seed=5, classes=5, train_per_class=1, val_per_class=12)
    for split in ("train", "val"):
        for label in (3, 4):
            shutil.rmtree(other / split / f"class_{label}")
    scored = {loader: evaluate_workdir(workdir, mode=mode, data_dir=str(other), loader=loader)
              for loader in ("grain", "dali")}
    assert scored["grain"]["num_examples"] == scored["dali"]["num_examples"] == 36
    assert 0 < scored["grain"]["error"] < 1
    assert abs(scored["grain"]["error"] - scored["dali"]["error"]) <= 1 / 36
    assert scored["dali"]["loss"] == pytest.approx(scored["grain"]["loss"], rel=1e-3)


class PreparedSplit:
    """What `tfds.data_source` reads from a prepared image split, made here from JPEGs: records
    with the image decoded, or as stored with `decoders={"image": SkipDecoding()}` (what it
    does on real ArrayRecord files; its mock data needs tensorflow to encode JPEGs)."""

    def __init__(self, folder, split, skip_decoding):
        self.files = image_records.ImageFolder(folder, split)
        self.skip_decoding = skip_decoding

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        data, label = self.files.encoded(index)
        image = data if self.skip_decoding else image_records.decode_image(data, "?")
        return {"image": image, "label": label}


@pytest.mark.dali
@pytest.mark.tfds
@pytest.mark.grain
def test_a_prepared_tfds_split_trains_and_scores_alike_through_either_loader(folder, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    split_folder = {"train": "train", "validation": "validation"}
    monkeypatch.setattr(tfds, "data_source", lambda name, split, data_dir=None, decoders=None: PreparedSplit(
        folder, split_folder[split], skip_decoding=decoders is not None))
    result = train_and_evaluate(dali_config("", name="imagenette"), tmp_path)
    grain = evaluate_workdir(tmp_path, loader="grain")
    assert grain["num_examples"] == 9 and grain["error"] == result["eval_error"]
    assert grain["loss"] == pytest.approx(result["eval_loss"], rel=1e-3)


@pytest.mark.dali
def test_sigterm_to_the_whole_group_during_a_dali_evaluation_saves_the_step_and_resumes_exactly(
        folder, tmp_path):
    """As a scheduler signals every process of a job, while DALI's pipelines (and their
    threads) decode the step-10 evaluation: the run saves the step it reached, exits 0, and
    resumed ends as an uninterrupted run does."""
    def command(workdir):
        return [*streamed_command(folder, workdir), "--config.dataset.loader=dali"]

    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run(command(uninterrupted), cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    workdir = tmp_path / "run"
    process = subprocess.Popen(command(workdir), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout = []
    for line in process.stdout:  # ends when train.py does, so cannot wait forever
        stdout.append(line)
        if line.startswith("step 10/40  train_loss"):  # the evaluation starts
            os.killpg(process.pid, signal.SIGTERM)
            break
    rest, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    await_group_exit(process.pid)
    step = preempted_step("".join(stdout) + rest, workdir)
    resumed = subprocess.run(command(workdir), cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert f"resuming at step {step}" in resumed.stdout
    assert_same_run(workdir, (uninterrupted, final_state(uninterrupted)), same_log_intervals=step % 2 == 0)


@pytest.mark.dali
def test_a_pipeline_dali_cannot_start_is_one_paragraph_naming_the_device_and_the_way_out(folder, monkeypatch):
    # As on a GPU whose driver DALI's CUDA 12 build cannot use: here, GPU decoding asked of the CPU.
    monkeypatch.setattr(dali, "decoder_device", lambda platform: "mixed")
    with pytest.raises(DataError, match=r"^DALI could not start its pipeline on .*\(.+\); pip install -e "
                                        r"'\.\[dali\]' installs DALI's CUDA 12 build, which needs an NVIDIA "
                                        r"driver for CUDA 12, or use the default loader"):
        opened(loader_config(folder, "dali"))


@pytest.mark.dali
def test_two_processes_train_and_evaluate_through_dali_like_one(folder, tmp_path):
    """Each process decodes the shares of its own devices (2 of the 4): the same batches,
    hence the same first step, as one process with all 4; and multi-scale testing in two
    processes scores as in one."""
    common = [
        "train.py", "--config=configs/imagenet.py:resnet18", "--config.model.name=resnet8",
        "--config.dataset.name=image_folder", f"--config.dataset.data_dir={folder}",
        "--config.dataset.image_size=16", "--config.dataset.scale_range=20,24",
        "--config.dataset.eval_resize=20", "--config.dataset.loader=dali",
        "--config.dataset.num_workers=0", "--config.batch_size=8", "--config.eval_batch_size=8",
        "--config.num_train_steps=2", "--config.log_every_steps=1", "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2", "--config.tensorboard=false",
    ]
    single = tmp_path / "single"
    finish(launch([*common, f"--workdir={single}"], devices=4))
    multi = tmp_path / "multi"
    assert "4 device(s)" in [finish(p) for p in launch_two(common, multi)][0]
    single_lines, multi_lines = lines(single), lines(multi)
    assert [line["step"] for line in multi_lines] == [line["step"] for line in single_lines]
    assert multi_lines[0]["train_loss"] == pytest.approx(single_lines[0]["train_loss"], abs=1e-5)

    assert_multi_scale_evaluation_alike(multi, num_examples=9)
