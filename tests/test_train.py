"""End to end: train.py's loop on tiny nets and data in the real formats, then evaluate."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import checkpoint
from resnet_jax.config import ConfigError, cifar_recipe
from resnet_jax.evaluate import evaluate_workdir
from resnet_jax.parallel import data_parallel
from resnet_jax.train import open_inputs, train_and_evaluate
from tests.fake_data import write_graded_fashion_mnist

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 100 test examples: the last eval batch (of 64) is padded.
    return write_graded_fashion_mnist(tmp_path_factory.mktemp("fake_fashion_mnist"), 0, 512, 100, gz=True)


def tiny_config(data_dir, **changes):
    config = cifar_recipe("resnet8", "fashion_mnist")
    config.dataset.data_dir = str(data_dir)
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_train_steps = 24
    config.log_every_steps = 4
    config.eval_every_steps = 12
    config.checkpoint_every_steps = 12
    config.tensorboard = False
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def read_lines(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    result = train_and_evaluate(tiny_config(data_dir), workdir)
    return workdir, result


def test_training_lowers_the_loss_and_writes_the_run(trained):
    workdir, result = trained
    lines = read_lines(workdir)
    train = [line for line in lines if "train_loss" in line]
    evals = [line for line in lines if "eval_error" in line]
    assert [line["step"] for line in train] == [4, 8, 12, 16, 20, 24]
    assert [line["step"] for line in evals] == [12, 24]
    assert train[-1]["train_loss"] < 0.7 * train[0]["train_loss"]
    assert all(0 <= line["train_error"] <= 1 and line["images_per_sec"] > 0 for line in train[1:])
    assert result["eval_error"] == evals[-1]["eval_error"] < 0.5  # chance is 0.9
    assert 0 <= result["eval_top5_error"] <= result["eval_error"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["config"]["model"]["name"] == "resnet8"
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [12, 24]


def test_evaluate_equals_the_in_training_eval(trained):
    workdir, _ = trained
    evals = {line["step"]: line for line in read_lines(workdir) if "eval_error" in line}
    for step in (12, 24):
        result = evaluate_workdir(workdir, step)
        assert result["step"] == step and result["num_examples"] == 100
        assert result["error"] == evals[step]["eval_error"]
        assert result["top5_error"] == evals[step]["eval_top5_error"]
        assert result["loss"] == evals[step]["eval_loss"]
    assert evaluate_workdir(workdir, "best")["step"] == min(evals, key=lambda s: (evals[s]["eval_error"], s))


def test_evaluate_with_a_smaller_eval_batch_scores_as_the_trained_one(trained):
    workdir, _ = trained
    trained_batch = evaluate_workdir(workdir, 24)  # batches of 64: the second one padded
    smaller = evaluate_workdir(workdir, 24, eval_batch_size=8)
    assert smaller["num_examples"] == 100
    assert (smaller["error"], smaller["top5_error"]) == (trained_batch["error"], trained_batch["top5_error"])
    np.testing.assert_allclose(smaller["loss"], trained_batch["loss"], rtol=1e-6)  # summed in other groups


@pytest.mark.parametrize("flags, named", [
    ({"eval_batch_size": 0}, "config.eval_batch_size = 0 is not accepted; expected a positive multiple"),
    ({"num_workers": -2}, "config.dataset.num_workers = -2 is not accepted"),
    ({"loader": "dali"}, "config.dataset.loader = 'dali' is not accepted; expected 'grain' for fashion"),
])
def test_evaluate_refuses_an_eval_batch_worker_count_or_loader_it_cannot_use(trained, flags, named):
    flags_named = "--eval_batch_size, --num_workers and --loader replace"
    with pytest.raises(ConfigError, match=re.escape(named) + ".*" + flags_named):
        evaluate_workdir(trained[0], **flags)


def test_an_eval_set_smaller_than_the_batch_runs_as_one_batch_of_its_own_size(trained, tmp_path):
    workdir, _ = trained
    tiny = write_graded_fashion_mnist(tmp_path, 0, 512, 6, gz=True)  # the same training split
    inputs = open_inputs(tiny_config(tiny), data_parallel(), ("train", "eval"))  # eval_batch_size 64
    assert inputs.eval_batch_size == 6
    with inputs.eval_passes("center") as one_pass:
        assert len(list(one_pass())) == 1
    whole = evaluate_workdir(workdir, 24, data_dir=str(tiny))
    in_threes = evaluate_workdir(workdir, 24, data_dir=str(tiny), eval_batch_size=3)
    assert whole["num_examples"] == in_threes["num_examples"] == 6
    assert whole["error"] == in_threes["error"]
    np.testing.assert_allclose(whole["loss"], in_threes["loss"], rtol=1e-6)


def test_evaluate_cli_prints_one_json_line(trained):
    workdir, _ = trained
    out = (
        subprocess.run(
            [sys.executable, "evaluate.py", f"--workdir={workdir}", "--split=train"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    result = json.loads(out[-1])
    assert result["step"] == 24 and result["num_examples"] == 512
    assert set(result) == {"step", "mode", "error", "top5_error", "loss", "num_examples"}


def test_load_returns_model_variables_and_config(trained):
    workdir, _ = trained
    model, variables, config = checkpoint.load(workdir)
    assert config.model.name == "resnet8" and config.num_train_steps == 24
    logits = model.apply(variables, jnp.zeros((2, 12, 12, 1)), train=False)
    assert logits.shape == (2, 10)


def test_load_on_a_writable_workdir_logs_no_orbax_notes(trained, caplog):
    with caplog.at_level(logging.INFO, logger="absl"):  # whatever absl's verbosity was set to
        checkpoint.load(trained[0])
        with checkpoint.manager(trained[0], read_only=True) as mngr:
            mngr.all_steps()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    with caplog.at_level(logging.INFO, logger="absl"):  # the filter is gone: Orbax's log is intact
        logging.getLogger("absl").warning("Given directory is read only=%s", "x")
    assert [r.getMessage() for r in caplog.records][-1] == "Given directory is read only=x"


def test_the_tensorboardx_note_comes_once_at_the_start_of_a_run_not_at_each_resume(
    data_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # not installed
    config = tiny_config(data_dir, num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=4,
                         tensorboard=True)
    train_and_evaluate(config, tmp_path / "run")
    assert capsys.readouterr().err.count("note: no TensorBoard events") == 1
    train_and_evaluate(config, tmp_path / "run")
    assert "TensorBoard" not in capsys.readouterr().err


def without_timing(lines):
    return [{k: v for k, v in line.items() if k != "images_per_sec"} for line in lines]


def test_an_interrupted_run_resumes_as_if_never_stopped(trained, data_dir, tmp_path, capsys):
    reference_dir, _ = trained
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config(data_dir), workdir)
    # As if killed after the step-12 checkpoint: the step-24 one was never written.
    shutil.rmtree(workdir / "checkpoints" / "24")
    capsys.readouterr()
    train_and_evaluate(tiny_config(data_dir), workdir)
    assert "resuming at step 12" in capsys.readouterr().out
    assert without_timing(read_lines(workdir)) == without_timing(read_lines(reference_dir))
    _, resumed, _ = checkpoint.load(workdir)
    _, uninterrupted, _ = checkpoint.load(reference_dir)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, uninterrupted)


def test_the_console_says_compiling_then_shows_the_first_step_then_every_log_interval(
    data_dir, tmp_path, capsys
):
    config = tiny_config(data_dir, num_train_steps=8, eval_every_steps=8, checkpoint_every_steps=8)
    train_and_evaluate(config, tmp_path / "run")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resnet8: ") and lines[0].endswith("from scratch")
    # The eval step compiles before training: its errors, and its time, come first.
    assert lines[1] == "compiling the eval step ..."
    assert re.fullmatch(r"compiled the eval step in \d+\.\d s", lines[2])
    assert lines[3] == "compiling the training step ..."
    assert re.fullmatch(r"compiled the training step in \d+\.\d s", lines[4])
    steps = [line.split()[1] for line in lines[5:-5]]
    assert steps == ["1/8", "4/8", "8/8", "8/8"]  # the first step, every log_every_steps, the eval
    assert "train_loss" in lines[5] and "eval_error" in lines[-6]
    assert lines[-5].startswith("test error ")  # the closing lines (below)
    assert [line["step"] for line in read_lines(tmp_path / "run") if "train_loss" in line] == [4, 8]


def test_a_finished_run_ends_with_its_error_and_how_to_evaluate_resume_and_plot_it(
    data_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the run's folder is shown as typed, relative to here
    config = tiny_config(data_dir, num_train_steps=8, eval_every_steps=8, checkpoint_every_steps=8)
    result = train_and_evaluate(config, "runs/r8")
    closing = capsys.readouterr().out.splitlines()[-5:]
    assert closing[0] == (f"test error {result['eval_error']:.2%} after 8 steps "
                          f"(top-5 {result['eval_top5_error']:.2%}, loss {result['eval_loss']:.4f})")
    assert closing[1] == "the run:  runs/r8 (config.json, metrics.jsonl, checkpoints/, checkpoint_checksums/)"
    python = sys.executable  # not below tmp_path: in full
    assert closing[2] == f"evaluate: {python} evaluate.py --workdir=runs/r8 [--step=best]"
    assert closing[3].startswith("resume:   rerun the same command")
    assert closing[4] == f"plot:     {python} -m resnet_jax.plot runs/r8 --out runs/r8/curves.png"
    assert (tmp_path / "runs/r8/metrics.jsonl").exists()


def test_rerunning_a_finished_run_reports_it_and_changes_nothing(trained, data_dir, capsys):
    workdir, result = trained
    before = {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in workdir.rglob("*")}
    capsys.readouterr()
    assert train_and_evaluate(tiny_config(data_dir), workdir) == result
    out = capsys.readouterr().out
    assert "step 24/24 was trained before: nothing to train and nothing changed" in out
    assert "compiling the training step" not in out
    assert f"test error {result['eval_error']:.2%} after 24 steps" in out
    assert {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in workdir.rglob("*")} == before


def test_a_workdir_of_another_run_is_refused_and_left_alone(trained, data_dir):
    workdir, _ = trained
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    with pytest.raises(checkpoint.WorkdirError, match=r"different run.*batch_size: 32 != 16"):
        train_and_evaluate(tiny_config(data_dir, batch_size=16), workdir)
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_steps_per_dispatch_gives_the_same_run(data_dir, tmp_path):
    one = train_and_evaluate(tiny_config(data_dir, num_train_steps=8, eval_every_steps=8), tmp_path / "a")
    four = train_and_evaluate(
        tiny_config(data_dir, num_train_steps=8, eval_every_steps=8, steps_per_dispatch=4), tmp_path / "b"
    )
    losses = [[line["train_loss"] for line in read_lines(tmp_path / d) if "train_loss" in line] for d in "ab"]
    # The same steps, compiled as a plain step and as a scan: XLA fuses and rounds them
    # differently, so they agree to float32 rounding at first (measured 1e-5 over steps
    # 1-4) and then drift apart as SGD amplifies the differences (2e-4, 6e-4 by step 8).
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-4)
    np.testing.assert_allclose(losses[0], losses[1], rtol=5e-3)
    assert four["eval_loss"] == pytest.approx(one["eval_loss"], rel=5e-3)


DEVICE_RUN = """
import json, sys
from resnet_jax.train import train_and_evaluate
from tests.test_train import tiny_config
config = tiny_config(sys.argv[1], num_train_steps=8, eval_every_steps=8, log_every_steps=1)
result = train_and_evaluate(config, sys.argv[2])
print(json.dumps(result))
"""


def run_on_devices(count, data_dir, workdir):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
    out = subprocess.run(
        [sys.executable, "-c", DEVICE_RUN, str(data_dir), str(workdir)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{count} device(s)" in out.stdout
    return json.loads(out.stdout.strip().splitlines()[-1]), read_lines(workdir)


def test_one_and_eight_devices_train_alike(data_dir, tmp_path):
    one, one_lines = run_on_devices(1, data_dir, tmp_path / "one")
    eight, eight_lines = run_on_devices(8, data_dir, tmp_path / "eight")
    losses = [
        [line["train_loss"] for line in lines if "train_loss" in line] for lines in (one_lines, eight_lines)
    ]
    # The first steps agree to float32 rounding: the sharded forward pass, the gradient
    # all-reduce and the update are the same computation. Each update sums the gradient in
    # another order (per device, then across), and on this tiny batch a few last-bit
    # differences later flip a ReLU or two and grow (seen: 1.8e-4 by step 8; 9e-3 with
    # Flax's one-pass BN variance, see models._batch_norm), so the whole run is held to 5e-3.
    assert len(losses[0]) == 8
    np.testing.assert_allclose(losses[0][:3], losses[1][:3], rtol=1e-5)
    np.testing.assert_allclose(losses[0], losses[1], rtol=5e-3)
    assert eight["eval_loss"] == pytest.approx(one["eval_loss"], rel=5e-3)


def test_a_workdir_saved_before_the_imagenet_keys_still_resumes_and_evaluates(trained, data_dir, tmp_path):
    import ml_collections

    from resnet_jax import config as config_lib

    workdir = shutil.copytree(trained[0], tmp_path / "old")
    record = json.loads((workdir / "config.json").read_text())
    added = ("num_classes", "image_size", "scale_range", "area_range", "aspect_ratio_range", "lighting_std",
             "eval_resize", "multi_scale_sizes", "skip_unreadable", "num_workers", "prefetch_batches")
    for key in added:  # as the config.json of a run from before these keys existed
        del record["config"]["dataset"][key]
    record["fingerprint"] = config_lib.fingerprint(ml_collections.ConfigDict(record["config"]))
    (workdir / "config.json").write_text(json.dumps(record))
    assert evaluate_workdir(workdir, 24)["error"] == evaluate_workdir(trained[0], 24)["error"]
    result = train_and_evaluate(tiny_config(data_dir), workdir)
    assert result["eval_error"] == trained[1]["eval_error"]  # nothing left to train: the same run
    assert not list(workdir.glob("config.*.json"))  # rewritten in place, not set aside as another run
    assert "image_size" in json.loads((workdir / "config.json").read_text())["config"]["dataset"]


def test_evaluating_a_small_dataset_in_ten_crop_or_multi_scale_mode_is_refused(trained):
    from resnet_jax.config import ConfigError

    for mode in ("ten_crop", "multi_scale"):
        with pytest.raises(ConfigError, match=rf"--mode={mode} needs a streamed dataset.*use --mode=center"):
            evaluate_workdir(trained[0], mode=mode)
