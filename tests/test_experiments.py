"""The paper's experiments on a tiny learnable Fashion-MNIST: tables and figures that match
the runs, reuse of finished runs, shortcuts, layer responses, --jobs, and bad input."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import backend, checkpoint
from resnet_jax.complexity import count_params
from resnet_jax.data.augment import normalization_stats, normalize
from resnet_jax.data.sources import load_split
from resnet_jax.evaluate import evaluate_workdir
from resnet_jax.experiments import command, error_tables, responses
from resnet_jax.experiments.nets import depth_nets
from resnet_jax.experiments.runs import RunOptions
from resnet_jax.models import RESPONSES, create_model
from resnet_jax.plot import read_metrics
from tests.fake_data import write_graded_fashion_mnist, write_image_folder

STEPS = 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_graded_fashion_mnist(tmp_path_factory.mktemp("fake_fashion_mnist"), 0, 256, 50, gz=True)


def argv(name, out, data_dir, *extra):
    return [
        name, "--out", str(out), "--dataset", "fashion_mnist", "--data_dir", str(data_dir),
        "--steps", str(STEPS), "--batch_size", "32", "--config.eval_batch_size=32",
        "--config.eval_every_steps=3", "--config.tensorboard=false", *extra,
    ]


def run(args, capsys=None):
    code = command.main(args)
    assert code == 0, capsys.readouterr().err if capsys else code


def files_of(out):
    return {path: path.read_bytes() for path in sorted(Path(out, "runs").rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def depth_out(data_dir, tmp_path_factory):
    """`depth` at depth 8 with 2 seeds; the figure it drew is kept for inspection."""
    out = tmp_path_factory.mktemp("results")
    figures = []
    with pytest.MonkeyPatch.context() as patch:
        original = error_tables.save_figure
        patch.setattr(error_tables, "save_figure", lambda fig, out: figures.append(fig) or original(fig, out))
        run(argv("depth", out, data_dir, "--depths", "8", "--seeds", "2"))
    return out, figures[0]


def test_depth_table_summary_and_figure_match_the_runs(depth_out):
    out, figure = depth_out
    summary = json.loads((out / "depth.json").read_text())
    assert [net["net"] for net in summary["nets"]] == ["plain-8", "ResNet-8"]
    assert summary["runs_trained_now"] == 4 and summary["runs_reused"] == 0
    table = (out / "depth.md").read_text()
    assert "python -m resnet_jax.experiments depth --out" in table and "wall time" in table
    assert "context, not a target" in table  # fashion_mnist at 6 steps is not the paper's setting
    for net in summary["nets"]:
        errors = []
        for seed, run_record in enumerate(net["runs"]):
            assert run_record["seed"] == seed and run_record["trained_now"]
            curves = read_metrics(out / run_record["workdir"])
            assert curves["eval_error"][-1][0] == STEPS
            errors.append(100 * curves["eval_error"][-1][1])
        spread = net["test_error_percent"]
        assert spread["per_seed"] == pytest.approx(errors)
        assert spread["mean"] == pytest.approx(np.mean(errors), abs=1e-3)
        assert spread["std"] == pytest.approx(np.std(errors, ddof=1), abs=1e-3)
        model = create_model(net["model"], num_classes=10)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 1)))
        assert net["params"] == count_params(variables["params"])
        assert net["paper_cifar10_test_error_percent"] is None  # the paper has no depth 8
        row = f"| {net['net']} | {net['params']:,} | {spread['mean']:.2f} ± {spread['std']:.2f} |"
        assert row in table
    assert (out / "depth.png").read_bytes().startswith(PNG_MAGIC)
    plain_panel, resnet_panel = figure.axes
    assert plain_panel.get_title().startswith("plain") and resnet_panel.get_title().startswith("ResNet")
    for panel, label in ((plain_panel, "plain-8"), (resnet_panel, "ResNet-8")):
        assert [text.get_text() for text in panel.get_legend().get_texts()] == [label, "train", "eval"]
        train_line, eval_line = panel.get_lines()  # seed 0's run: thin training, bold test error
        assert train_line.get_linewidth() < eval_line.get_linewidth()
        assert list(eval_line.get_xdata()) == [3, 6]


def test_paper_numbers_sit_beside_resnets_of_the_papers_depths(tmp_path):
    nets = depth_nets(tmp_path, [20, 110], 1, RunOptions("cifar10", None, None, None, ()))
    assert [(net.label, net.paper_test_error) for net in nets] == [
        ("plain-20", None), ("plain-110", None), ("ResNet-20", 8.75), ("ResNet-110", 6.43),
    ]
    assert error_tables.setting_notes(nets).count("\n\n") == 0  # the paper's setting: no caveat


def test_the_depth_sweep_trains_no_plain_1202_as_the_paper_has_none(tmp_path):
    nets = depth_nets(tmp_path, [20, 1202], 1, RunOptions("cifar10", None, None, None, ()))
    assert [net.label for net in nets] == ["plain-20", "ResNet-20", "ResNet-1202"]
    models = {run.config.model.name for net in nets for run in net.runs}
    assert models == {"plain20", "resnet20", "resnet1202"}


def test_repeating_the_command_reuses_the_finished_runs(depth_out, data_dir, capsys):
    out, _ = depth_out
    before = files_of(out)
    run(argv("depth", out, data_dir, "--depths", "8", "--seeds", "2"), capsys)
    assert "reusing finished run" in capsys.readouterr().out
    assert files_of(out) == before  # no metrics line, checkpoint or config written
    summary = json.loads((out / "depth.json").read_text())
    assert summary["runs_trained_now"] == 0 and summary["runs_reused"] == 4
    assert not any(run["trained_now"] for net in summary["nets"] for run in net["runs"])


def test_shortcuts_train_b_and_c_and_share_the_option_a_run(depth_out, data_dir):
    out, _ = depth_out
    run(argv("shortcuts", out, data_dir, "--depths", "8"))
    summary = json.loads((out / "shortcuts.json").read_text())
    nets = summary["nets"]
    assert [(net["net"], net["shortcut"]) for net in nets] == [("ResNet-8", option) for option in "ABC"]
    assert [net["runs"][0]["workdir"] for net in nets] == ["runs/resnet8_seed0", "runs/resnet8_B_seed0",
                                                           "runs/resnet8_C_seed0"]
    assert summary["runs_trained_now"] == 2  # A is depth's ResNet-8
    params = [net["params"] for net in nets]
    assert params[0] < params[1] < params[2]  # B projects where shapes change, C everywhere
    assert "| ResNet-8 | C |" in (out / "shortcuts.md").read_text()


def test_responses_equal_a_direct_computation_from_the_model(depth_out, data_dir):
    out, _ = depth_out
    run(argv("responses", out, data_dir, "--depths", "8", "--response_images", "45"))
    record = json.loads((out / "responses.json").read_text())
    assert record["runs_trained_now"] == 0 and record["num_images"] == 45  # depth's runs, reused
    assert (out / "responses.png").read_bytes().startswith(PNG_MAGIC)
    train = load_split("fashion_mnist", "train", data_dir)
    mean, std = normalization_stats(train.images, "per_pixel_mean")
    raw = load_split("fashion_mnist", "test", data_dir).images[:45]
    images = normalize(jnp.asarray(raw), mean, std)
    for net in record["nets"]:
        model, variables, config = checkpoint.load(out / net["workdir"])
        _, state = model.apply(variables, images, train=False, mutable=[RESPONSES])
        sown = state[RESPONSES]
        expected = [sown["stem_response"][0]] + [
            sown[block]["response"][i] for block in ("conv2_1", "conv3_1", "conv4_1") for i in (0, 1)
        ]
        assert net["layers"] == ["conv1", "conv2_1/1", "conv2_1/2", "conv3_1/1", "conv3_1/2",
                                 "conv4_1/1", "conv4_1/2"]
        direct = [np.std(np.asarray(response, np.float64)) for response in expected]
        assert net["std"] == pytest.approx(direct, rel=1e-4)
        # Batches of 16, 16 and 13 images, combined, give the same stds as one batch.
        _, batched = responses.response_stds(model, variables, raw, mean, std, batch_size=16,
                                             compiler_options=backend.compiler_options(config.model.conv))
        assert batched == pytest.approx(direct, rel=1e-4)
        assert net["std_sorted"] == sorted(net["std"], reverse=True)
    assert [net["net"] for net in record["nets"]] == ["plain-8", "ResNet-8"]


def test_two_jobs_train_in_subprocesses_as_one_after_another_would(depth_out, data_dir, tmp_path):
    out, _ = depth_out
    run(argv("depth", tmp_path, data_dir, "--depths", "8", "--jobs", "2"))
    assert json.loads((tmp_path / "depth.json").read_text())["runs_trained_now"] == 2
    for name in ("plain8_seed0", "resnet8_seed0"):
        assert (tmp_path / "logs" / f"{name}.log").is_file()
        parallel, sequential = read_metrics(tmp_path / "runs" / name), read_metrics(out / "runs" / name)
        for metric in ("train_loss", "train_error", "eval_error"):
            assert parallel[metric] == sequential[metric]


def test_another_config_in_out_is_refused_before_training(depth_out, data_dir, capsys):
    out, _ = depth_out
    before = files_of(out)
    assert command.main(argv("depth", out, data_dir, "--depths", "8", "--config.learning_rate=0.05")) == 2
    error = capsys.readouterr().err
    assert "already holds run 'plain8_seed0' of another config" in error and "learning_rate" in error
    assert files_of(out) == before


@pytest.mark.parametrize("extra, message", [
    (["--depths", "9"], "not a CIFAR depth 6n+2"),
    (["--depths", "50"], "names an ImageNet net"),
    (["--seeds", "0"], "expected an integer >= 1"),
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
])
def test_bad_flags_are_refused_naming_what_is_accepted(tmp_path, data_dir, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv("depth", tmp_path / "out", data_dir, *extra))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_experiment_names_the_accepted_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        command.main(["width", "--out", str(tmp_path)])
    error = capsys.readouterr().err
    assert "invalid choice: 'width'" in error and all(name in error for name in command.EXPERIMENTS)


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "2"], "responses uses each net's seed-0 run"),
    (["--config.learning_rte=0.1"], "did you mean 'learning_rate'"),
])
def test_bad_responses_input_is_an_error_before_training(tmp_path, data_dir, capsys, extra, message):
    assert command.main(argv("responses", tmp_path / "out", data_dir, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(tmp_path, data_dir, capsys):
    (tmp_path / "results").write_text("mine")
    assert command.main(argv("depth", tmp_path / "results", data_dir)) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err
    assert (tmp_path / "results").read_text() == "mine"


@pytest.mark.parametrize("out, message", [
    ("gs:/bucket/results", "two slashes"),
    # With gcsfs installed a gs:// folder is refused as not local; without, for lack of gcsfs.
    ("gs://bucket/results", "results go to a local folder|needs gcsfs"),
])
def test_out_on_object_storage_is_refused_without_a_local_gs_folder(out, message, tmp_path, data_dir, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv("depth", out, data_dir))
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


@pytest.mark.grain
def test_table2_trains_plain_and_option_a_resnets_18_and_34_on_an_image_folder(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "images", seed=3)  # 3 classes x (6 train, 3 val)
    args = [
        "table2", "--out", str(tmp_path / "out"), "--dataset", "image_folder", "--data_dir", str(folder),
        "--steps", "2", "--batch_size", "4", "--config.eval_batch_size=4", "--config.tensorboard=false",
        "--config.dataset.num_workers=0", "--config.dataset.image_size=16", "--config.dataset.eval_resize=20",
        "--config.dataset.scale_range=(20,24)",
    ]
    run(args, capsys)
    summary = json.loads((tmp_path / "out" / "table2.json").read_text())
    nets = summary["nets"]
    assert [(net["net"], net["shortcut"]) for net in nets] == [
        ("plain-18", "none"), ("plain-34", "none"), ("ResNet-18", "A"), ("ResNet-34", "A")]
    assert [net["paper_table2_top1_10crop_error_percent"] for net in nets] == [27.94, 28.54, 27.88, 25.03]
    for net in nets:
        config = checkpoint.read_config(tmp_path / "out" / net["runs"][0]["workdir"])
        assert config.model.shortcut == ("A" if net["net"].startswith("ResNet") else "")
        assert (config.num_train_steps, config.dataset.num_classes) == (2, 3)
    resnet18 = nets[2]
    workdir = tmp_path / "out" / resnet18["runs"][0]["workdir"]
    ten_crop = evaluate_workdir(workdir, 2, mode="ten_crop")["error"]
    assert resnet18["ten_crop_error_percent"]["per_seed"] == pytest.approx([100 * ten_crop], abs=1e-3)
    # Option A adds no parameters: each ResNet has exactly its plain net's.
    params = {net["net"]: net["params"] for net in nets}
    assert params["ResNet-18"] == params["plain-18"] and params["ResNet-34"] == params["plain-34"]
    table = (tmp_path / "out" / "table2.md").read_text()
    assert "| ResNet-34 | A |" in table and "context, not a target" in table
    assert (tmp_path / "out" / "table2.png").read_bytes().startswith(PNG_MAGIC)
    run(args, capsys)  # repeated: every run reused, none trained again
    assert json.loads((tmp_path / "out" / "table2.json").read_text())["runs_trained_now"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--depths", "20"], "table2 trains the paper's plain-18, plain-34, ResNet-18 and ResNet-34"),
    (["--dataset", "cifar10"], "table2 trains on image_folder, imagenet2012, imagenette"),
])
def test_bad_table2_input_is_an_error_before_training(tmp_path, capsys, extra, message):
    assert command.main(["table2", "--out", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
