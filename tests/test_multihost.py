"""Several processes through jax.distributed: 2 processes with 2 CPU devices each train
like 1 process with 4 (on data on the devices, and streamed, each process reading its
share), and their checkpoint evaluates in a single process (and a streamed one in two,
as in one)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet_jax import checkpoint, parallel
from resnet_jax.evaluate import evaluate_workdir
from tests.fake_data import write_graded_fashion_mnist, write_image_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "--config=configs/fashion_mnist_resnet20.py", "--config.model.name=resnet8",
    "--config.batch_size=32", "--config.eval_batch_size=64", "--config.num_train_steps=12",
    "--config.log_every_steps=4", "--config.eval_every_steps=6", "--config.checkpoint_every_steps=6",
    "--config.tensorboard=false",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_graded_fashion_mnist(tmp_path_factory.mktemp("fake_fashion_mnist"), 2, 256, 70, gz=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, devices, **kwargs):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def launch_two(args, workdir):
    """Two processes of `args` with 2 CPU devices each, joined by a loopback coordinator."""
    address = f"127.0.0.1:{free_port()}"
    return [
        launch([*args, f"--workdir={workdir}", f"--coordinator_address={address}", "--num_processes=2",
                f"--process_id={i}"], devices=2)
        for i in range(2)
    ]


def finish(process):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def shapes(output: str) -> set[str]:
    """The lines of a console output with their numbers blanked: what a message says, not
    the figures in it."""
    return {re.sub(r"\d+", "#", line) for line in output.splitlines() if line.strip()}


def lines(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one_and_their_checkpoint_evaluates_in_one(data_dir, tmp_path):
    common = ["train.py", *FLAGS, f"--config.dataset.data_dir={data_dir}"]
    single = tmp_path / "single"
    single_output = finish(launch([*common, f"--workdir={single}"], devices=4))

    multi = tmp_path / "multi"
    processes = launch_two(common, multi)
    outputs = [finish(p) for p in processes]
    assert "4 device(s)" in outputs[0] and "step 12/12" in outputs[0]
    # The project's messages (all a one-process run prints) come from the first process
    # only. What the collectives library itself prints, from threads that may interleave
    # it, is not the project's and not asserted on.
    assert "4 device(s)" in single_output and "step 12/12" in single_output
    assert shapes(single_output) & shapes(outputs[0])  # recognised in a multi-process output
    assert shapes(single_output) & shapes(outputs[1]) == set()

    single_lines, multi_lines = lines(single), lines(multi)
    assert [line["step"] for line in multi_lines] == [line["step"] for line in single_lines]
    for a, b in zip(single_lines, multi_lines, strict=True):
        for key in ("train_loss", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
        for key in ("train_error", "eval_error", "eval_top5_error"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=0.02), (a["step"], key)

    final_eval = [line for line in multi_lines if "eval_error" in line][-1]
    result = evaluate_workdir(multi)  # here: one process, one device
    assert result["step"] == 12 and result["num_examples"] == 70
    assert result["error"] == pytest.approx(final_eval["eval_error"], abs=0.02)
    assert result["loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-4)


def streamed_folder_command(folder):
    """train.py on a tiny streamed image folder (ResNet-8 on 16x16 crops), read without input
    workers; the steps, intervals and workdir are the caller's."""
    return [
        "train.py", "--config=configs/imagenet.py:resnet18", "--config.model.name=resnet8",
        "--config.dataset.name=image_folder", f"--config.dataset.data_dir={folder}",
        "--config.dataset.image_size=16", "--config.dataset.scale_range=20,24",
        "--config.dataset.eval_resize=20", "--config.dataset.num_workers=0", "--config.batch_size=8",
        "--config.eval_batch_size=8",
    ]


@pytest.mark.grain
def test_two_processes_train_on_a_streamed_image_folder_like_one(tmp_path):
    folder = write_image_folder(tmp_path / "images", seed=0)  # 3 classes x (6 train, 3 val)
    common = [
        *streamed_folder_command(folder),
        "--config.num_train_steps=2", "--config.log_every_steps=1", "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2", "--config.tensorboard=false",
    ]
    single = tmp_path / "single"
    finish(launch([*common, f"--workdir={single}"], devices=4))
    multi = tmp_path / "multi"
    processes = launch_two(common, multi)
    assert "4 device(s)" in [finish(p) for p in processes][0]
    single_lines, multi_lines = lines(single), lines(multi)
    assert [line["step"] for line in multi_lines] == [line["step"] for line in single_lines]
    assert multi_lines[0]["step"] == 1
    assert multi_lines[0]["train_loss"] == pytest.approx(single_lines[0]["train_loss"], abs=1e-5)

    assert_multi_scale_evaluation_alike(multi, num_examples=9)


def saved_steps(workdir) -> list[int]:
    with checkpoint.manager(workdir, read_only=True) as mngr:
        return mngr.all_steps()  # the finished saves only (on GCS: those with commit_success.txt)


def kill_after_first_checkpoint(processes, workdir, victim: int):
    """SIGKILL process `victim` once the run's first checkpoint is saved; the outputs of all."""
    while not (workdir / "checkpoints").exists() or not saved_steps(workdir):
        assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
        time.sleep(0.1)
    processes[victim].kill()
    return [p.communicate(timeout=600) for p in processes]


# Short, so that a lost process is noticed within seconds here; users set it alike.
HEARTBEAT = "--heartbeat_timeout=10"
LONGER = [*FLAGS, "--config.num_train_steps=24", "--config.checkpoint_every_steps=4",
          "--config.eval_every_steps=12", HEARTBEAT]


def test_when_a_process_dies_the_other_stops_naming_it_and_a_rerun_resumes(data_dir, tmp_path):
    common = ["train.py", *LONGER, f"--config.dataset.data_dir={data_dir}"]
    workdir = tmp_path / "run"
    processes = launch_two(common, workdir)
    (_, survivor_err), _ = kill_after_first_checkpoint(processes, workdir, victim=1)
    assert processes[1].returncode == -signal.SIGKILL
    # Process 0 stops on its own with one paragraph (its peer watch: half the heartbeat
    # timeout after process 1's last beat), before the runtime's heartbeat timeout would
    # abort it (status 134 and a C++ stack dump).
    assert processes[0].returncode == parallel.LOST_PROCESS_EXIT_STATUS, survivor_err[-3000:]
    paragraph = survivor_err.strip().splitlines()[-2:]
    assert paragraph[0].startswith("error: process 1 of this 2-process run stopped answering"), survivor_err
    assert paragraph[1].startswith("  python train.py ") and "--process_id=0" in paragraph[1]
    assert "Traceback" not in survivor_err and "Check failure" not in survivor_err

    last = max(saved_steps(workdir))
    resumed = [finish(p) for p in launch_two(common, workdir)]
    assert f"resuming at step {last}" in resumed[0] and "step 24/24" in resumed[0]
    assert [line["step"] for line in lines(workdir)] == [4, 8, 12, 12, 16, 20, 24, 24]


def assert_multi_scale_evaluation_alike(workdir, num_examples: int):
    """A multi-scale evaluation of `workdir` by 2 processes x 2 devices, each reading the
    image sizes of half the records, gives what 1 process x 4 devices gives."""
    evaluate = ["evaluate.py", f"--workdir={workdir}", "--mode=multi_scale"]
    alone = json.loads(finish(launch(evaluate, devices=4)).splitlines()[-1])
    address = f"127.0.0.1:{free_port()}"
    together = [launch([*evaluate, f"--coordinator_address={address}", "--num_processes=2",
                        f"--process_id={i}"], devices=2) for i in range(2)]
    result = json.loads([finish(p) for p in together][0].splitlines()[-1])
    assert result["num_examples"] == alone["num_examples"] == num_examples
    assert result["error"] == alone["error"] and result["loss"] == pytest.approx(alone["loss"], rel=1e-5)
