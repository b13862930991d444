"""ResNet-110's warm-up as the paper states it (Sec. 4.2), on a real run: 0.01 until a
logged training error falls below the threshold, then the main rate; the switch is in
the train state, so a run resumed before or after it continues exactly as one that never
stopped."""

import shutil

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint
from resnet_jax.train import train_and_evaluate
from tests.fake_data import write_graded_fashion_mnist
from tests.test_train import read_lines, tiny_config, without_timing

THRESHOLD = 0.5  # the tiny net on graded data gets there after a few logs at 0.01


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_graded_fashion_mnist(tmp_path_factory.mktemp("fake_fashion_mnist"), 0, 512, 100, gz=True)


def warmup_config(data_dir):
    # No drops, so the two rates are the only ones: 0.01 while warming up, 0.1 after.
    return tiny_config(data_dir, lr_warmup="until_error", lr_warmup_value=0.01,
                       lr_warmup_until_error=THRESHOLD, lr_boundaries=(), checkpoint_every_steps=4,
                       keep_checkpoints=10)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("warmup_run")
    train_and_evaluate(warmup_config(data_dir), workdir)
    return workdir


def train_lines(workdir):
    return [line for line in read_lines(workdir) if "train_loss" in line]


def switch_step(workdir) -> int:
    (step,) = [line["lr_warmup_end"] for line in train_lines(workdir) if "lr_warmup_end" in line]
    return step


def test_the_rate_switches_at_the_first_logged_error_below_the_threshold(reference):
    lines = train_lines(reference)
    switch = switch_step(reference)
    assert 4 < switch < 24  # a checkpoint before it and one after it, for the resume tests
    assert [line["train_error"] < THRESHOLD for line in lines if line["step"] <= switch] == (
        [False] * (switch // 4 - 1) + [True])
    for line in lines:
        # The logged rate is that of the interval's last step: the switch applies after it.
        assert line["learning_rate"] == pytest.approx(0.01 if line["step"] <= switch else 0.1), line


@pytest.mark.parametrize("side", ["before", "after"])
def test_a_run_resumed_before_or_after_the_switch_continues_as_if_never_stopped(reference, data_dir,
                                                                                  tmp_path, side, capsys):
    switch = switch_step(reference)
    saved = sorted(int(p.name) for p in (reference / "checkpoints").iterdir())
    before, after = [s for s in saved if s < switch], [s for s in saved if s >= switch]
    resume_at = max(before) if side == "before" else min(after)
    assert resume_at < 24
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for step in saved:
        if step > resume_at:  # as if killed right after the checkpoint of `resume_at`
            shutil.rmtree(workdir / "checkpoints" / str(step))
    capsys.readouterr()
    train_and_evaluate(warmup_config(data_dir), workdir)
    out = capsys.readouterr().out
    assert f"resuming at step {resume_at}" in out
    # Resumed after the switch, the run knows it happened: it does not happen again.
    assert (f"warm-up ended at step {switch}:" in out) == (side == "before")
    assert without_timing(read_lines(workdir)) == without_timing(read_lines(reference))
    _, resumed, _ = checkpoint.load(workdir)
    _, uninterrupted, _ = checkpoint.load(reference)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, uninterrupted)
