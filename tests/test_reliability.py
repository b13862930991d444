"""Dependable runs: kills, preemption, damaged checkpoints, divergence, mismatched workdirs.

The kill and SIGTERM trials run train.py as a user would, in a subprocess, on a tiny
net and tiny data in the real Fashion-MNIST format (or a tiny streamed image folder, read
by input worker processes), and compare the interrupted-and-resumed run with an
uninterrupted one bit for bit. Each signal goes to the run's whole process group, as a
terminal's Ctrl-C and a scheduler do, at a moment the run shows (a line it prints), never
after a delay, which a faster machine would outrun.
"""

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint, integrity, preemption
from resnet_jax.state import abstract_train_state, build_model
from resnet_jax.train import TrainingDiverged, train_and_evaluate
from tests.fake_data import write_graded_fashion_mnist, write_image_folder
from tests.test_train import tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
KILL_TRIALS = 3
SIGTERM_TRIALS = 2
FLAGS = [
    "--config=configs/fashion_mnist_resnet20.py",
    "--config.model.name=resnet8",
    "--config.batch_size=32",
    "--config.eval_batch_size=64",
    "--config.num_train_steps=40",
    "--config.log_every_steps=2",
    "--config.eval_every_steps=10",
    "--config.checkpoint_every_steps=2",
    "--config.keep_checkpoints=2",
    "--config.tensorboard=false",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_graded_fashion_mnist(tmp_path_factory.mktemp("fake_fashion_mnist"), 1, 256, 70, gz=False)


def train_command(data_dir, workdir):
    return [
        sys.executable,
        "train.py",
        *FLAGS,
        f"--config.dataset.data_dir={data_dir}",
        f"--workdir={workdir}",
    ]


def run_train(data_dir, workdir):
    out = subprocess.run(train_command(data_dir, workdir), cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def progress_line(step):
    """The start of the progress line train.py prints for `step`'s training interval."""
    return f"step {step}/40  train_loss"


def start_in_own_group(command, stderr=subprocess.PIPE):
    """`command` started as a terminal or a scheduler starts a job: in a process group of its
    own, which `os.killpg(process.pid, sig)` signals whole."""
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            start_new_session=True)


def read_until(process, start: str, stderr_file=None) -> list[str]:
    """The lines `process` prints up to the first that begins with `start`, which it must print
    (else the error shows its output, and `stderr_file`'s where its stderr went there)."""
    lines = []
    for line in process.stdout:  # ends when the process does, so cannot wait forever
        lines.append(line)
        if line.startswith(start):
            return lines
    process.wait(timeout=60)
    stderr = ""
    if stderr_file is not None:
        stderr_file.seek(0)
        stderr = f"\nits stderr:\n{stderr_file.read()[-3000:]}"
    raise AssertionError(f"train.py ended (exit status {process.returncode}) without printing {start!r}: "
                         f"{''.join(lines)[-3000:]}{stderr}")


def start_and_signal(data_dir, workdir, sig, after_step):
    """Start train.py and signal its process group as soon as it prints the progress line of
    `after_step`: with FLAGS, that step's metrics are written and its checkpoint (every 2
    steps) is about to be saved; Orbax finished the save of `after_step - 2` before it began
    the one before."""
    with tempfile.TemporaryFile("w+") as stderr_file:  # not a pipe: nobody reads it until the end
        process = start_in_own_group(train_command(data_dir, workdir), stderr=stderr_file)
        stdout = read_until(process, progress_line(after_step), stderr_file)
        sent_at = time.time()
        os.killpg(process.pid, sig)
        rest, _ = process.communicate(timeout=120)
        stderr_file.seek(0)
        return process.returncode, "".join(stdout) + rest, stderr_file.read(), time.time() - sent_at


def seeded_step(seed):
    """A logged step of the 40 (every 2) before the last, chosen by `seed`."""
    return 2 * random.Random(seed).randint(1, 19)


def final_state(workdir):
    config = checkpoint.read_config(workdir)
    with checkpoint.manager(workdir, read_only=True) as mngr:
        step = max(mngr.all_steps())
        return step, checkpoint.restore(mngr, step, abstract_train_state(config, build_model(config)))


def without_timing(workdir):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_sec"} for line in lines]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_train(data_dir, workdir)
    return workdir, final_state(workdir)


def assert_same_run(workdir, reference, same_log_intervals=True, steps=40):
    reference_dir, (reference_step, reference_state) = reference
    step, state = final_state(workdir)
    assert step == reference_step == steps
    # Bit-identical: params, BN statistics, optimizer state and step.
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, reference_state)
    lines, reference_lines = without_timing(workdir), without_timing(reference_dir)
    if not same_log_intervals:  # a preempted run logs its last, partial interval too
        lines, reference_lines = (
            [line for line in x if "eval_error" in line] for x in (lines, reference_lines)
        )
    assert lines == reference_lines


def preempted_step(stdout: str, workdir) -> int:
    """The step a preempted run says it saved, checked to be its newest checkpoint."""
    stops = ("preempted: saved", "interrupted: saved")  # not "interrupted: saving", on stderr
    line = next(line for line in stdout.splitlines() if line.startswith(stops))
    step = int(line.split("checkpoint of step ")[1].split(";")[0])
    with checkpoint.manager(workdir, read_only=True) as mngr:
        assert max(mngr.all_steps()) == step
    return step


@pytest.mark.parametrize("trial", range(KILL_TRIALS))
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(trial, data_dir, reference, tmp_path):
    workdir = tmp_path / "run"
    returncode, _, _, _ = start_and_signal(data_dir, workdir, signal.SIGKILL, seeded_step(trial))
    assert returncode == -signal.SIGKILL
    out = run_train(data_dir, workdir)
    assert "resuming at step" in out.stdout or "from scratch" in out.stdout
    assert_same_run(workdir, reference)
    assert not any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").iterdir())


@pytest.mark.parametrize(
    ("sig", "trial"), [(signal.SIGTERM, trial) for trial in range(SIGTERM_TRIALS)] + [(signal.SIGINT, 0)]
)
def test_sigterm_or_ctrl_c_saves_the_current_step_and_exits_cleanly(sig, trial, data_dir, reference,
                                                                     tmp_path):
    workdir = tmp_path / "run"
    returncode, stdout, stderr, seconds = start_and_signal(data_dir, workdir, sig, seeded_step(100 + trial))
    assert returncode == 0 and seconds < 60, stderr
    assert "Traceback" not in stderr
    step = preempted_step(stdout, workdir)
    # A scheduler's SIGTERM is a preemption; a user's Ctrl-C is named as what it is.
    stop = "interrupted" if sig == signal.SIGINT else "preempted"
    assert f"{stop}: saved the checkpoint of step {step}" in stdout
    out = run_train(data_dir, workdir)
    assert f"resuming at step {step}" in out.stdout
    assert_same_run(workdir, reference, same_log_intervals=step % 2 == 0)


# The same run on a streamed image folder, decoded by 2 input worker processes; an evaluation
# (with its own workers) every 10 steps.
STREAMED_FLAGS = [
    "--config=configs/imagenet.py:resnet18", "--config.model.name=resnet8",
    "--config.dataset.name=image_folder",
    "--config.dataset.image_size=16", "--config.dataset.scale_range=20,24", "--config.dataset.eval_resize=20",
    "--config.dataset.num_workers=2", "--config.batch_size=4", "--config.eval_batch_size=8",
    *FLAGS[4:],  # the steps, intervals and checkpoints of the Fashion-MNIST run
]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), seed=0)  # 3 classes x (6 train, 3 val)


def streamed_command(folder, workdir):
    return [sys.executable, "train.py", *STREAMED_FLAGS, f"--config.dataset.data_dir={folder}",
            f"--workdir={workdir}"]


def run_streamed(folder, workdir):
    out = subprocess.run(streamed_command(folder, workdir), cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def streamed_reference(image_folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted_streamed")
    run_streamed(image_folder, workdir)
    return workdir, final_state(workdir)


def await_group_exit(group: int) -> None:
    """Wait until no process of the process group `group` is left (the input workers too)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {group} outlived train.py")


@pytest.mark.grain
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_process_group_with_input_workers_saves_the_step_and_resumes_exactly(
        sig, image_folder, streamed_reference, tmp_path):
    """As a scheduler (SIGTERM) or a terminal (Ctrl-C) signals every process of the job: the
    input workers survive it, the trainer saves the step it reached and exits 0, and every
    process of the group is gone. SIGTERM comes again and again during the step-10
    evaluation, so that it reaches that evaluation's workers as they start and as they work;
    Ctrl-C once, a while into training."""
    workdir = tmp_path / "run"
    process = start_in_own_group(streamed_command(image_folder, workdir))
    stdout = []
    if sig == signal.SIGTERM:
        stdout += read_until(process, "step 10/40  train_loss")  # the evaluation and its workers start
        evaluated = threading.Event()

        def keep_signalling():
            with contextlib.suppress(ProcessLookupError):  # the group ended
                while not evaluated.wait(0.1):
                    os.killpg(process.pid, sig)

        signaller = threading.Thread(target=keep_signalling)
        signaller.start()
        # Not later: the trainer restores SIGTERM's default as it ends.
        stdout += read_until(process, "step 10/40  eval_loss")
        evaluated.set()
        signaller.join()
    else:
        stdout += read_until(process, progress_line(seeded_step(7)))
        os.killpg(process.pid, sig)
    rest, stderr = process.communicate(timeout=120)
    stdout = "".join(stdout) + rest
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    await_group_exit(process.pid)
    step = preempted_step(stdout, workdir)
    out = run_streamed(image_folder, workdir)
    assert f"resuming at step {step}" in out.stdout
    assert_same_run(workdir, streamed_reference, same_log_intervals=step % 2 == 0)


@pytest.mark.grain
def test_a_file_descriptor_limit_too_low_for_the_pools_is_refused_before_compiling_and_the_need_suffices(
        image_folder, tmp_path):
    """`ulimit -n` below what the stated figures give for 2 training and 2 evaluation workers
    passing 38x38 crops (in the workers' rings: no shared-memory block) is one paragraph,
    exit 2, before anything compiles or is written; at exactly that number the run trains
    and evaluates."""
    from resnet_jax.data import pool_limits

    flags = ["--config.dataset.image_size=38", "--config.dataset.scale_range=40,44",
             "--config.dataset.eval_resize=40", "--config.dataset.eval_workers=2",
             "--config.num_train_steps=4", "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2"]
    need = pool_limits.FIXED_FDS + (pool_limits.FDS_PER_WORKER + pool_limits.RING_FDS_PER_WORKER) * 4

    def run_with_limit(limit, workdir):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        return subprocess.run([*streamed_command(image_folder, workdir), *flags], cwd=REPO_ROOT,
                              capture_output=True, text=True,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard)))

    low = run_with_limit(need - 1, tmp_path / "low")
    assert low.returncode == 2 and "Traceback" not in low.stderr, low.stderr[-3000:]
    message = low.stderr
    assert f"needs about {need} file descriptors, but this process may open {need - 1} (ulimit -n)" in message
    assert f"Run `ulimit -n {need}`" in message
    assert "2 training and 2 evaluation worker processes" in message
    assert "compil" not in low.stdout and not (tmp_path / "low").exists()
    enough = run_with_limit(need, tmp_path / "enough")
    assert enough.returncode == 0, enough.stderr[-3000:]
    assert "step 4/4  eval_loss" in enough.stdout  # trained and evaluated with both pools


def test_ctrl_c_while_train_py_imports_its_libraries_stops_in_one_line(data_dir, tmp_path):
    """Python's -X importtime prints a line as each module is imported: Ctrl-C comes as JAX's
    are, a second or so before train.py has imported everything it needs."""
    workdir = tmp_path / "run"
    command = train_command(data_dir, workdir)
    process = start_in_own_group([command[0], "-X", "importtime", *command[1:]])
    imported = []
    for line in process.stderr:  # ends when train.py does, so cannot wait forever
        imported.append(line)
        module = line.rsplit("|", 1)[-1].strip()
        if line.startswith("import time:") and module.split(".")[0] in ("jax", "jaxlib"):
            break
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    stderr = "".join(imported) + stderr
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    messages = [line for line in stderr.splitlines() if line and not line.startswith("import time:")]
    assert messages == ["interrupted while starting: nothing was run or written"], messages
    assert "Traceback" not in stderr and not stdout and not workdir.exists()


def start_and_await_compilation(data_dir, workdir):
    """Start train.py in a process group of its own and return it once it says it is compiling
    the training step, which it compiles afresh (not loaded from the compilation cache)."""
    process = start_in_own_group([*train_command(data_dir, workdir), "--config.compilation_cache_dir="])
    read_until(process, "compiling the training step")
    return process


def test_ctrl_c_during_compilation_saves_the_first_step_and_the_run_resumes(data_dir, reference, tmp_path):
    workdir = tmp_path / "run"
    process = start_and_await_compilation(data_dir, workdir)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted: saving a checkpoint" in stderr
    assert "interrupted: saved the checkpoint of step 1; rerun the same command to resume" in stdout
    with checkpoint.manager(workdir, read_only=True) as mngr:
        assert mngr.all_steps() == [1]
    out = run_train(data_dir, workdir)
    assert "resuming at step 1" in out.stdout
    assert_same_run(workdir, reference, same_log_intervals=False)


def interrupt_twice_during_compilation(data_dir, workdir):
    """Ctrl-C twice to train.py's process group while it compiles; its stdout and stderr."""
    process = start_and_await_compilation(data_dir, workdir)
    os.killpg(process.pid, signal.SIGINT)
    # Sent before the first was delivered, a second signal would merge with it.
    assert any(line.startswith("interrupted: saving") for line in process.stderr)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    return stdout, stderr


def test_a_second_ctrl_c_stops_at_once_even_during_compilation(data_dir, reference, tmp_path):
    workdir = tmp_path / "run"
    stdout, stderr = interrupt_twice_during_compilation(data_dir, workdir)
    assert "Traceback" not in stderr and "interrupted again: stopped at once" in stderr
    assert "compiled the training step" not in stdout  # it did not wait for compilation to end
    assert "no checkpoint was saved yet, so rerunning the same command starts from scratch" in stderr
    assert not (workdir / "checkpoints").exists() or not list((workdir / "checkpoints").iterdir())
    run_train(data_dir, workdir)
    assert_same_run(workdir, reference)


def test_a_second_ctrl_c_names_the_checkpoint_a_rerun_resumes_from(data_dir, tmp_path):
    workdir = tmp_path / "run"
    process = start_and_await_compilation(data_dir, workdir)
    os.killpg(process.pid, signal.SIGINT)  # once: the first step is saved
    assert process.wait(timeout=120) == 0
    _, stderr = interrupt_twice_during_compilation(data_dir, workdir)
    assert "rerun the same command to resume from the checkpoint of step 1" in stderr
    out = run_train(data_dir, workdir)
    assert "resuming at step 1" in out.stdout


def test_a_second_ctrl_c_after_a_damaged_checkpoint_names_the_one_the_run_fell_back_to(data_dir, reference,
                                                                                      tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    flip_a_byte(workdir / "checkpoints" / "40")  # set aside as the run starts: it resumes at 38
    _, stderr = interrupt_twice_during_compilation(data_dir, workdir)
    assert "rerun the same command to resume from the checkpoint of step 38" in stderr
    out = run_train(data_dir, workdir)
    assert "resuming at step 38" in out.stdout
    assert_same_run(workdir, reference)


@pytest.mark.parametrize(("finished", "unfinished", "hint"), [
    (None, None, "no checkpoint was saved yet, so rerunning the same command starts from scratch"),
    (8, None, "rerun the same command to resume from the checkpoint of step 8"),
    (None, 2, "rerunning the same command resumes from the checkpoint of step 2 if its save had finished, "
              "else from scratch"),
    (8, 10, "rerunning the same command resumes from the checkpoint of step 10 if its save had finished, "
            "else from that of step 8"),
])
def test_a_second_ctrl_c_says_where_a_rerun_resumes_with_a_save_under_way_or_not(finished, unfinished, hint):
    """A save under way may have finished by the time of the second Ctrl-C; nothing tells
    until the next save or a wait."""
    mngr = types.SimpleNamespace(finished_step=finished, unfinished_step=unfinished)
    assert preemption.rerun_hint(mngr) == hint


@pytest.fixture(scope="module")
def large_eval_data_dir(tmp_path_factory):
    """The training split of `data_dir` with a test split large enough that evaluating it
    takes a while (about a second on a 2-core CPU), where the 70 examples take milliseconds."""
    return write_graded_fashion_mnist(tmp_path_factory.mktemp("large_eval"), 1, 256, 20_000, gz=False)


def test_ctrl_c_during_an_evaluation_stops_after_it_at_the_next_step(large_eval_data_dir, tmp_path):
    """The step-10 evaluation follows the step's training line. The stop comes at the step
    after it (step 11): step 10's check for a stop came before the evaluation. stderr is
    read with stdout, in the order written, to see the signal taken during the evaluation."""
    workdir = tmp_path / "run"
    process = start_in_own_group(train_command(large_eval_data_dir, workdir), stderr=subprocess.STDOUT)
    before = read_until(process, progress_line(10))
    os.killpg(process.pid, signal.SIGINT)
    output = "".join(before) + process.communicate(timeout=120)[0]
    assert process.returncode == 0 and "Traceback" not in output, output[-3000:]
    taken, evaluated = output.index("interrupted: saving"), output.index("step 10/40  eval_loss")
    assert taken < evaluated, output[-3000:]
    assert "interrupted: saved the checkpoint of step 11" in output and preempted_step(output, workdir) == 11
    out = run_train(large_eval_data_dir, workdir)
    assert "resuming at step 11" in out.stdout


def test_ctrl_c_during_the_final_save_ends_the_run_as_finished(data_dir, reference, tmp_path):
    """The last step's checkpoint is saved as its evaluation's line is printed; Ctrl-C then
    leaves the run to end as it would have, with its closing lines."""
    workdir = tmp_path / "run"
    process = start_in_own_group(train_command(data_dir, workdir))
    before = read_until(process, "step 40/40  eval_loss")
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    stdout = "".join(before) + stdout
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted: saving" in stderr  # taken by the run, not after it
    assert "test error" in stdout and "evaluate:" in stdout
    assert_same_run(workdir, reference)
    out = run_train(data_dir, workdir)
    assert "step 40/40 was trained before" in out.stdout


def group_processes(group: int) -> list[int]:
    """The processes of the process group `group` now (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that just ended
            # pgrp is the 5th field; the 2nd, the command, is in parentheses and may hold spaces
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == group:
                found.append(int(stat.parent.name))
    return found


def group_size(group: int) -> int:
    """How many processes the process group `group` holds now."""
    return len(group_processes(group))


def maps_a_memory_file(pid: int, name: str) -> bool:
    """Whether process `pid` maps a memory file named `name` (`data/memory_files.py`): an
    image folder's shared file list, a worker's piece ring."""
    with contextlib.suppress(OSError):  # a process that just ended
        return f"/memfd:{name}" in Path(f"/proc/{pid}/maps").read_text()
    return False


def maps_a_shared_file_list(pid: int) -> bool:
    return maps_a_memory_file(pid, "resnet_jax-shared-arrays")


def shared_memory_held(pids) -> set[str]:
    """The /dev/shm files (still named there) that the processes `pids` hold open or map."""
    targets = []
    for pid in pids:
        with contextlib.suppress(OSError):  # a process that just ended
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            targets += [line.split(maxsplit=5)[-1] for line in maps]
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):  # a descriptor just closed
                    targets.append(os.readlink(fd))
    return {t for t in targets if t.startswith("/dev/shm/") and not t.endswith("(deleted)")}


def orphaned_shared_memory(before: set[str], semaphores: set[str]) -> list[str]:
    """The files in /dev/shm, apart from `before`, that no process holds open or maps: left
    behind by a process that ended. Of multiprocessing's semaphores (`sem.mp-...`, which
    any Python process on the host may be making and removing), only `semaphores`."""
    all_pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    new = {str(p) for p in Path("/dev/shm").iterdir()} - before
    new = {name for name in new if not name.startswith("/dev/shm/sem.mp-") or name in semaphores}
    return sorted(new - shared_memory_held(all_pids))


@pytest.mark.grain
@pytest.mark.parametrize("stop", ["end", signal.SIGINT, signal.SIGKILL], ids=["end", "SIGINT", "SIGKILL"])
def test_the_workers_map_the_trainers_file_list_and_nothing_of_it_outlives_the_run(stop, image_folder,
                                                                                   tmp_path):
    """The input workers map the training process's file list rather than copying it, and
    hand their pieces over in rings that the trainer maps, none of them in /dev/shm; when
    the run ends, is interrupted by Ctrl-C to its group, or its trainer is killed outright,
    nothing of the list or the rings is left behind (no file in the run's temporary
    directory or /dev/shm, the workers gone)."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    shm_before = {str(p) for p in Path("/dev/shm").iterdir()}
    command = [*streamed_command(image_folder, tmp_path / "run"), "--config.num_train_steps=8"]
    environment = {**os.environ, "TMPDIR": str(temporary)}
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env=environment)
    read_until(process, "step 4/8  train_loss")  # the training workers are decoding
    assert maps_a_shared_file_list(process.pid)
    workers = [pid for pid in group_processes(process.pid) if pid != process.pid]
    assert sum(map(maps_a_shared_file_list, workers)) >= 2, workers  # the 2 training workers at least
    assert maps_a_memory_file(process.pid, "resnet_jax-piece-ring")  # a training worker's ring
    # Every piece crossed in a ring: the run holds in /dev/shm only the semaphores of
    # multiprocessing's queues (a page each; its resource tracker removes them).
    held = shared_memory_held([process.pid, *workers])
    assert {name for name in held if not name.startswith("/dev/shm/sem.mp-")} == set(), held
    if stop == signal.SIGINT:
        os.killpg(process.pid, stop)
    elif stop == signal.SIGKILL:
        process.kill()  # the trainer alone: its workers end with it
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == (-signal.SIGKILL if stop == signal.SIGKILL else 0), stderr[-3000:]
    await_group_exit(process.pid)
    assert list(temporary.iterdir()) == []
    assert orphaned_shared_memory(shm_before, semaphores=held) == []


@pytest.mark.grain
def test_a_second_ctrl_c_to_the_group_stops_the_trainer_and_its_input_workers_at_once(image_folder, tmp_path):
    # Compiled afresh (not loaded from the compilation cache): the signals come meanwhile.
    command = [*streamed_command(image_folder, tmp_path / "run"), "--config.compilation_cache_dir="]
    process = start_in_own_group(command)
    read_until(process, "compiling the training step")
    # The training pipeline's 2 workers start before the step compiles (seconds, here).
    deadline = time.time() + 60
    while group_size(process.pid) < 3:
        assert time.time() < deadline and process.poll() is None, "the input workers never started"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    assert any(line.startswith("interrupted: saving") for line in process.stderr)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "interrupted again: stopped at once" in stderr and "compiled the training step" not in stdout
    # Stopped before its first checkpoint: the hint says a rerun starts afresh, not that it resumes.
    assert "no checkpoint was saved yet, so rerunning the same command starts from scratch" in stderr
    await_group_exit(process.pid)


def test_leftovers_of_a_killed_save_are_cleaned_and_the_last_checkpoint_used(data_dir, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "40")
    leftover = workdir / "checkpoints" / "40.orbax-checkpoint-tmp-1234567890"
    leftover.mkdir()
    (leftover / "partial").write_bytes(b"\0" * 100)
    out = run_train(data_dir, workdir)
    assert "resuming at step 38" in out.stdout
    assert not leftover.exists()
    assert_same_run(workdir, reference)


def array_files(step_dir):
    return sorted(p for p in (step_dir / "default").rglob("*") if p.is_file() and "/d/" in str(p))


def flip_a_byte(step_dir):
    target = max(array_files(step_dir), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def truncate(step_dir):
    target = max(array_files(step_dir), key=lambda p: p.stat().st_size)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


def drop_half_the_item_metadata(step_dir):
    """What a save killed part-way can leave: item metadata listing only some arrays."""
    path = step_dir / "default" / "_METADATA"
    metadata = json.loads(path.read_text())
    entries = list(metadata["tree_metadata"].items())
    metadata["tree_metadata"] = dict(entries[: len(entries) // 2])
    path.write_text(json.dumps(metadata))


DAMAGE = {
    "deleted file": lambda d: [p.unlink() for p in array_files(d)],
    "truncated file": truncate,
    "flipped byte": flip_a_byte,
    "missing metadata": lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
    "partial item metadata": drop_half_the_item_metadata,
    "empty step folder": lambda d: [shutil.rmtree(d), d.mkdir()],
    # Killed after Orbax committed the step, before its checksums were recorded.
    "checksums never recorded": lambda d: integrity.record_path(d.parent.parent, int(d.name)).unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_reported_and_the_run_falls_back(damage, data_dir, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    DAMAGE[damage](workdir / "checkpoints" / "40")
    with pytest.raises(checkpoint.WorkdirError, match=str(workdir / "checkpoints" / "40")):
        checkpoint.load(workdir, 40)
    out = run_train(data_dir, workdir)
    assert "checkpoints/40" in out.stderr and "warning" in out.stderr
    assert "resuming at step 38" in out.stdout
    assert (workdir / checkpoint.DAMAGED_DIR / "40").exists()  # kept for inspection
    assert_same_run(workdir, reference)


def test_when_every_checkpoint_is_damaged_the_run_stops(data_dir, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    for step_dir in (workdir / "checkpoints").iterdir():
        flip_a_byte(step_dir)
    result = subprocess.run(train_command(data_dir, workdir), cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "every checkpoint" in result.stderr and "damaged" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_diverging_run_stops_naming_the_step_and_saves_nothing_non_finite(data_dir, tmp_path, monkeypatch):
    from resnet_jax import schedules

    paper_schedule = schedules.learning_rate_schedule

    def poisoned(config):
        schedule = paper_schedule(config)
        return lambda step, warmup_end: jax.numpy.where(step >= 5, jax.numpy.nan, schedule(step, warmup_end))

    monkeypatch.setattr(schedules, "learning_rate_schedule", poisoned)
    config = tiny_config(data_dir, num_train_steps=12, log_every_steps=4, checkpoint_every_steps=4)
    with pytest.raises(TrainingDiverged, match="step 6: the parameters stopped being finite"):
        train_and_evaluate(config, tmp_path)
    with checkpoint.manager(tmp_path, read_only=True) as mngr:
        assert mngr.all_steps() == [4]


def test_a_checkpoint_of_another_model_is_refused_naming_the_first_difference(data_dir, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    command = train_command(data_dir, workdir)
    for flags, words in [
        ([], ["different run", "model.name: 'resnet8' != 'resnet14'", "--allow_config_change"]),
        (
            ["--allow_config_change"],
            ["does not fit", "batch_stats/conv2_2/bn1/mean is absent in the checkpoint"],
        ),
    ]:
        out = subprocess.run(
            [*command, "--config.model.name=resnet14", *flags], cwd=REPO_ROOT, capture_output=True, text=True
        )
        assert out.returncode == 2
        for word in words:
            assert word in out.stderr
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_allow_config_change_continues_a_run_and_keeps_its_old_config(data_dir, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    old_config = (workdir / "config.json").read_text()
    out = subprocess.run(
        [*train_command(data_dir, workdir), "--config.num_train_steps=44", "--allow_config_change"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming at step 40" in out.stdout
    kept = [p for p in workdir.glob("config.*.json")]
    assert len(kept) == 1 and kept[0].read_text() == old_config
    assert checkpoint.read_config(workdir).num_train_steps == 44


def test_checkpoints_without_a_config_are_not_written_to(data_dir, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    (workdir / "config.json").unlink()
    out = subprocess.run(train_command(data_dir, workdir), cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "no config.json" in out.stderr
    assert not (workdir / "config.json").exists()


BAD_INPUT = [
    (["--config.learning_rate=-1"], "learning_rate"),
    (["--config.model.name=resnet9"], "6n+2"),
    (["--config.model.shortcut=Z"], "model.shortcut"),
    (["--config.dataset.name=imagenet"], "dataset.name"),
    (["--config.batch_size=three"], "batch_size"),
    (["--config.num_train_steps=0"], "num_train_steps"),
    (["--config.dataset.data_dir=/nonexistent"], "/nonexistent"),
]


@pytest.mark.parametrize("flags, word", BAD_INPUT)
def test_bad_input_is_refused_before_anything_is_written(flags, word, data_dir, tmp_path):
    workdir = tmp_path / "run"
    out = subprocess.run(
        [*train_command(data_dir, workdir), *flags], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2 and word in out.stderr and "Traceback" not in out.stderr
    assert not workdir.exists()


def test_a_bad_flag_is_one_line_naming_it_and_the_help(data_dir, tmp_path):
    workdir = tmp_path / "run"
    commands = {
        "train.py": [*train_command(data_dir, workdir), "--bogus_flag=1"],
        "evaluate.py": [sys.executable, "evaluate.py", f"--workdir={workdir}", "--mode=tencrop"],
    }
    named = {"train.py": "unrecognized arguments: --bogus_flag=1",
             "evaluate.py": "argument --mode: invalid choice: 'tencrop' (choose from 'center', 'ten_crop'"}
    for script, command in commands.items():
        out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        assert out.returncode == 2 and out.stderr.startswith(f"error: {named[script]}"), out.stderr
        assert out.stderr.strip().endswith(f"`{script} --help` lists the flags"), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("below", [False, True])
def test_a_workdir_that_is_or_lies_below_a_file_is_refused_in_one_paragraph(below, data_dir, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("a user's file\n")
    workdir = afile / "run" if below else afile
    evaluate = [sys.executable, "evaluate.py", f"--workdir={workdir}"]
    for command in (train_command(data_dir, workdir), evaluate):
        out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        what = f"lies below {afile}, a file" if below else "is a file"
        assert out.returncode == 2 and out.stderr.startswith(f"error: workdir {workdir} {what}: "), out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert afile.read_text() == "a user's file\n"


def config_file(folder, name, line):
    path = folder / name
    path.write_text(
        "from resnet_jax.config import cifar_recipe\n\n\ndef get_config():\n"
        f"    config = cifar_recipe('resnet8', 'fashion_mnist')\n    {line}\n    return config\n"
    )
    return path


def test_bad_config_files_and_bad_data_are_refused(data_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    images = broken / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    workdir = tmp_path / "run"
    for args, word in [
        (
            [f"--config={config_file(tmp_path, 'typed.py', 'config.batch_size = str(128)')}"],
            "typed.py' failed: TypeError: Could not override field 'batch_size'",
        ),
        (
            [f"--config={config_file(tmp_path, 'typo.py', 'config.batch_szie = 64')}"],
            "unknown config key 'batch_szie'; did you mean 'batch_size'?",
        ),
        (
            [f"--config={config_file(tmp_path, 'missing.py', 'del config.seed')}"],
            "config key 'seed' is missing",
        ),
        ([*FLAGS, f"--config.dataset.data_dir={broken}"], "train-images-idx3-ubyte"),
    ]:
        out = subprocess.run(
            [sys.executable, "train.py", *args, f"--workdir={workdir}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 2 and word in out.stderr, out.stderr[-2000:]
        assert not workdir.exists()


def test_batch_not_divisible_by_the_devices_is_refused(data_dir, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3")
    workdir = tmp_path / "run"
    out = subprocess.run(
        train_command(data_dir, workdir), cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 2 and "multiple of the device count (3)" in out.stderr
    assert not workdir.exists()
