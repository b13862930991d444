"""Workdir paths: local paths made absolute, gs:// URLs kept, and a gs:// workdir that cannot
be reached refused before anything runs (never a local "gs:" folder). Training against a
real gs:// workdir is tests/test_gcs.py."""

import importlib.util
import os

import pytest
from etils import epath

from resnet_jax import checkpoint, cli, workdir
from resnet_jax.evaluate import evaluate_workdir
from resnet_jax.plot import MetricsError, read_metrics
from resnet_jax.workdir import WorkdirError, workdir_path, write_text_atomically
from tests.test_reliability import FLAGS, REPO_ROOT
from tests.test_train import tiny_config


@pytest.fixture
def without_gcs_clients(monkeypatch):
    """As where neither gcsfs nor tensorflow is installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        workdir.importlib.util, "find_spec",
        lambda name, *args: None if name in workdir.GCS_CLIENTS else real(name, *args),
    )


@pytest.fixture
def with_a_gcs_client(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        workdir.importlib.util, "find_spec",
        lambda name, *args: real("json") if name == "gcsfs" else real(name, *args),
    )


def test_local_workdirs_become_absolute_epaths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = workdir_path("runs/r20")
    assert isinstance(path, epath.Path) and os.fspath(path) == str(tmp_path / "runs" / "r20")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert os.fspath(workdir_path("~/r20")) == str(tmp_path / "home" / "r20")
    assert workdir_path(path) == path


def test_gs_urls_stay_urls(with_a_gcs_client):
    path = workdir_path("gs://bucket/runs/r20")
    assert os.fspath(path) == "gs://bucket/runs/r20" and workdir.is_object_storage(path)
    assert os.fspath(path / checkpoint.CONFIG_FILE) == "gs://bucket/runs/r20/config.json"
    assert not workdir.is_object_storage(workdir_path("runs/r20"))


@pytest.mark.parametrize(("text", "words"), [
    ("gs:/bucket/run", "two slashes"),
    ("s3://bucket/run", "s3:// is not supported"),
])
def test_urls_that_would_become_local_folders_are_refused(text, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkdirError, match=words):
        workdir_path(text)
    assert not list(tmp_path.iterdir())


def test_a_gs_workdir_without_a_client_is_refused_naming_what_to_install(without_gcs_clients):
    with pytest.raises(WorkdirError, match=r"gs:// needs gcsfs .*pip install -e '\.\[gcs\]'"):
        workdir_path("gs://bucket/run")


def test_a_gs_workdir_that_cannot_be_reached_is_one_paragraph_naming_it(with_a_gcs_client, monkeypatch):
    def unreachable(path):  # what tensorflow's gs:// file system raises offline
        raise RuntimeError("Could not resolve host: storage host\n  traceback lines")

    path = workdir_path("gs://bucket/run")
    monkeypatch.setattr(type(path), "exists", unreachable)
    with pytest.raises(WorkdirError, match=r"gs://bucket/run cannot be reached \(RuntimeError: Could not "
                                           r"resolve host: storage host\); check the network"):
        workdir.check_reachable(path)


def test_a_local_workdir_is_not_probed(tmp_path, monkeypatch):
    path = workdir_path(tmp_path / "run")
    monkeypatch.setattr(type(path), "exists", lambda path: pytest.fail("probed"))
    workdir.check_reachable(path)


def test_train_and_evaluate_refuse_it_before_compiling_or_writing(without_gcs_clients, tmp_path, monkeypatch,
                                                                  capsys):
    import train as train_cli
    from resnet_jax import train

    def reached(*args, **kwargs):
        raise AssertionError("the data was opened before the workdir was checked")

    monkeypatch.setattr(train, "open_inputs", reached)
    monkeypatch.chdir(tmp_path)
    config_file = f"--config={REPO_ROOT}/configs/fashion_mnist_resnet20.py"  # FLAGS[0], from here
    argv = [config_file, *FLAGS[1:], f"--config.dataset.data_dir={tmp_path}", "--workdir=gs://bucket/run"]
    assert cli.run(train_cli.main, train_cli.parser(), argv) == 2
    assert "pip install -e '.[gcs]'" in capsys.readouterr().err
    with pytest.raises(WorkdirError, match="gcsfs"):
        train.train_and_evaluate(tiny_config(tmp_path), "gs://bucket/run")
    with pytest.raises(WorkdirError, match="gcsfs"):
        evaluate_workdir("gs://bucket/run")
    with pytest.raises(MetricsError, match="gcsfs"):
        read_metrics("gs://bucket/run")
    assert not list(tmp_path.iterdir())  # above all no ./gs:/bucket/run


def test_an_atomic_write_leaves_no_partial_file(tmp_path):
    path = workdir_path(tmp_path / "config.json")
    write_text_atomically(path, "one\n")
    write_text_atomically(path, "two\n")
    assert path.read_text() == "two\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_step_damaged_twice_is_set_aside_under_a_new_name(tmp_path):
    damaged = workdir_path(tmp_path / checkpoint.DAMAGED_DIR)
    for content in ("first", "second"):
        step_dir = workdir_path(tmp_path / "checkpoints" / "40")
        step_dir.mkdir(parents=True)
        (step_dir / "data").write_text(content)
        checkpoint._set_aside(step_dir, damaged)
        assert not step_dir.exists()
    assert (damaged / "40" / "data").read_text() == "first"
    assert (damaged / "40.2" / "data").read_text() == "second"
