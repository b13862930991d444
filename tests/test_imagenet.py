"""End to end on streamed data in ImageNet's formats, made here: an image folder and
TFDS's mock imagenet2012. Train, checkpoint, resume, and evaluate in the paper's modes."""

import json
import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint
from resnet_jax.config import imagenet_recipe
from resnet_jax.data import image_records, stream
from resnet_jax.evaluate import evaluate_workdir
from resnet_jax.train import train_and_evaluate
from tests.fake_data import write_image_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
# Sizes that keep the CPU fast: 16 px crops of 20-24 px images, scales 16 and 24.
SMALL_SIZES = dict(image_size=16, scale_range=(20, 24), eval_resize=20, multi_scale_sizes=(16, 24))

pytestmark = pytest.mark.grain


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), seed=1)  # 3 classes x (6 train, 3 val)


def small_config(name="image_folder", data_dir="", **changes):
    config = imagenet_recipe("resnet8", name)
    config.dataset.data_dir = str(data_dir)
    config.dataset.update(dict(SMALL_SIZES, num_workers=0, prefetch_batches=1))
    config.batch_size, config.eval_batch_size = 4, 4
    config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 4, 2, 2
    config.log_every_steps, config.tensorboard = 1, False
    config.update(changes)
    return config


def metrics_lines(workdir):
    lines = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_sec"} for line in lines]


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    return workdir, train_and_evaluate(small_config(data_dir=folder), workdir)


def test_training_on_an_image_folder_saves_the_class_count_and_evaluates_in_every_mode(trained):
    workdir, result = trained
    saved = checkpoint.read_config(workdir)
    assert saved.dataset.num_classes == 3  # from the folders, so the model rebuilds without them
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]
    center = evaluate_workdir(workdir, mode="center")
    assert center["num_examples"] == 9 and center["step"] == 4
    assert (center["error"], center["top5_error"], center["loss"]) == (
        result["eval_error"], result["eval_top5_error"], result["eval_loss"])
    # Another eval batch and worker count at evaluation time: the same scores.
    in_twos = evaluate_workdir(workdir, mode="center", eval_batch_size=2, num_workers=1)
    assert in_twos["num_examples"] == 9
    assert (in_twos["error"], in_twos["top5_error"]) == (center["error"], center["top5_error"])
    np.testing.assert_allclose(in_twos["loss"], center["loss"], rtol=1e-6)
    for mode in ("ten_crop", "multi_scale"):
        scored = evaluate_workdir(workdir, mode=mode)
        assert scored["mode"] == mode and scored["num_examples"] == 9
        assert 0 <= scored["top5_error"] <= scored["error"] <= 1 and np.isfinite(scored["loss"])
        assert scored["loss"] != center["loss"]  # other views, other scores
    probabilities = evaluate_workdir(workdir, mode="multi_scale", average="probabilities")
    assert probabilities["average"] == "probabilities" and probabilities["num_examples"] == 9
    assert probabilities["loss"] != scored["loss"]  # the softmax before the spatial average


def test_a_run_resumed_mid_epoch_ends_identical_to_an_uninterrupted_one(trained, folder, tmp_path, capsys):
    reference, _ = trained
    workdir = tmp_path / "run"
    train_and_evaluate(small_config(data_dir=folder), workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")  # killed after step 2 (of an 18-image epoch)
    capsys.readouterr()
    train_and_evaluate(small_config(data_dir=folder), workdir)
    assert "resuming at step 2" in capsys.readouterr().out
    assert metrics_lines(workdir) == metrics_lines(reference)
    _, resumed, _ = checkpoint.load(workdir)
    _, uninterrupted, _ = checkpoint.load(reference)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, uninterrupted)


@pytest.mark.parametrize("ends", ["finished", "failed"])
def test_a_run_evaluates_through_one_eval_pipeline_and_closes_every_pipeline(
        folder, tmp_path, monkeypatch, ends):
    pipelines = []

    class Recorded(stream.HostBatches):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            pipelines.append(self)

        def close(self):
            super().close()
            self.closed = True

    monkeypatch.setattr(stream, "HostBatches", Recorded)
    config = small_config(data_dir=folder, eval_every_steps=1, checkpoint_every_steps=4)
    config.dataset.num_workers = 1
    if ends == "failed":  # after the 4 evaluations, with every pipeline open
        def fail(*args):
            raise OSError("disk full")
        monkeypatch.setattr(checkpoint, "save", fail)
        with pytest.raises(OSError, match="disk full"):
            train_and_evaluate(config, tmp_path)
    else:
        train_and_evaluate(config, tmp_path)
    assert sum("eval_error" in line for line in metrics_lines(tmp_path)) == 4
    assert len(pipelines) == 2  # training, and one for the 4 evaluations (the normalisation sample: none)
    assert all(pipeline.closed for pipeline in pipelines) and not multiprocessing.active_children()


def await_file(path: Path, what: str, seconds: float = 120) -> None:
    """Wait for `path` to exist; a guard against hanging, failing naming `what` did not happen."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds} s")
        time.sleep(0.01)


class RendezvousSource:
    """An image source whose reads in a worker process mark `worker_read` and then wait for
    `compiling` to exist; reads in the training process (the start-up checks and the
    normalisation sample) go straight through."""

    def __init__(self, source, worker_read: Path, compiling: Path):
        self.source, self.worker_read, self.compiling = source, worker_read, compiling
        self.num_classes, self.classes = source.num_classes, source.classes

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        if multiprocessing.parent_process() is not None:
            self.worker_read.touch()
            await_file(self.compiling, "the training step's compilation while the workers decode")
        return self.source[index]


def test_the_training_step_compiles_while_the_input_workers_start(folder, tmp_path, monkeypatch):
    """The workers' first read waits for the compilation to begin, and the compilation waits
    for a worker's first read: a run that compiled first and then started the workers, or
    the other way round, would fail here."""
    from resnet_jax import train

    worker_read, compiling = tmp_path / "worker_read", tmp_path / "compiling"
    open_split = image_records.open_split

    def rendezvous_train_split(name, split, *args):
        records = open_split(name, split, *args)
        return RendezvousSource(records, worker_read, compiling) if split == "train" else records

    compile_ahead, compiled = train.compile_ahead, []

    def compile_meeting_the_workers(step, name, *args):
        if name == "training step":
            compiling.touch()
            await_file(worker_read, "a worker's first read while the training step compiled")
            compiled.append(name)
        return compile_ahead(step, name, *args)

    monkeypatch.setattr(image_records, "open_split", rendezvous_train_split)
    monkeypatch.setattr(train, "compile_ahead", compile_meeting_the_workers)
    config = small_config(data_dir=folder, num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
    config.dataset.num_workers = 1
    assert "eval_error" in train_and_evaluate(config, tmp_path / "run")
    assert compiled == ["training step"]


def test_evaluation_refuses_data_with_other_classes(trained, tmp_path):
    workdir, _ = trained
    other = write_image_folder(tmp_path / "other", seed=2, classes=4, train_per_class=2, val_per_class=1)
    with pytest.raises(Exception, match=r"num_classes = 3, but .* has 4 class folders"):
        evaluate_workdir(workdir, data_dir=str(other))


@pytest.mark.tfds
def test_tfds_imagenet2012_mock_trains_and_evaluates_in_every_mode(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=10):
        result = train_and_evaluate(small_config("imagenet2012", num_train_steps=2), tmp_path)
        assert np.isfinite(result["eval_loss"])
        for mode in ("center", "ten_crop", "multi_scale"):
            scored = evaluate_workdir(tmp_path, mode=mode)
            assert scored["num_examples"] == 10  # every validation record, the last batch padded
    _, variables, _ = checkpoint.load(tmp_path)
    assert variables["params"]["fc"]["kernel"].shape[-1] == 1000


def run(*args):
    out = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_train_and_evaluate_commands_on_an_image_folder_with_the_imagenet_resnet18_config(folder, tmp_path):
    workdir = tmp_path / "resnet18"
    sizes = [f"--config.dataset.{k}={v}".replace(" ", "") for k, v in SMALL_SIZES.items()]
    run("train.py", "--config=configs/imagenet.py:resnet18", f"--workdir={workdir}",
        "--config.dataset.name=image_folder", f"--config.dataset.data_dir={folder}",
        "--config.num_train_steps=2", "--config.batch_size=8", "--config.eval_batch_size=8",
        "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2", "--config.tensorboard=false",
        "--config.dataset.num_workers=1", *sizes)
    assert (workdir / "checkpoints" / "2").is_dir()
    result = json.loads(run("evaluate.py", f"--workdir={workdir}", "--mode=multi_scale").splitlines()[-1])
    assert result["mode"] == "multi_scale" and result["step"] == 2 and result["num_examples"] == 9
