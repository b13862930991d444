"""Configs: the recipes, command-line overrides, and refusals before anything runs."""

import subprocess
import sys
from pathlib import Path

import pytest

from resnet_jax import config as config_lib
from resnet_jax.config import ConfigError, apply_overrides, cifar_recipe, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = [f"cifar10_{kind}{d}" for kind in ("resnet", "plain") for d in (20, 32, 44, 56, 110)]


@pytest.mark.parametrize(
    "name", ["default", "cifar10_resnet1202", "fashion_mnist_resnet56", "cifar100_plain20", *PAPER_CONFIGS]
)
def test_every_config_file_loads_and_validates(name):
    config = config_lib.load(REPO_ROOT / "configs" / f"{name}.py")
    validate(config, num_devices=1)
    for key in (
        "model.name",
        "dataset.name",
        "dataset.data_dir",
        "batch_size",
        "num_train_steps",
        "learning_rate",
        "eval_every_steps",
        "checkpoint_every_steps",
        "seed",
    ):
        assert key in config_lib.flat_keys(config)


def test_the_paper_recipe():
    config = config_lib.load(REPO_ROOT / "configs" / "default.py")
    assert (config.model.name, config.dataset.name) == ("resnet20", "cifar10")
    assert (config.batch_size, config.num_train_steps, config.learning_rate) == (128, 64_000, 0.1)
    assert (config.momentum, config.weight_decay, config.lr_warmup) == (0.9, 1e-4, "none")
    assert [round(f * 64_000) for f in config.lr_boundaries] == [32_000, 48_000]
    assert (config.dataset.augment, config.dataset.crop_padding) == ("pad_crop_flip", 4)
    assert config.dataset.normalization == "per_pixel_mean"


def test_overrides_take_the_type_of_the_key():
    config = cifar_recipe("resnet20")
    apply_overrides(
        config,
        [
            ("model.name", "resnet56"),
            ("batch_size", "64"),
            ("learning_rate", "1"),
            ("tensorboard", "false"),
            ("lr_boundaries", "(0.3, 0.6, 0.9)"),
        ],
    )
    assert config.model.name == "resnet56" and config.batch_size == 64
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.tensorboard is False and config.lr_boundaries == (0.3, 0.6, 0.9)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("modle.name", "x", ["unknown config key 'modle.name'", "did you mean 'model.name'"]),
        ("batch_size", "12.5", ["batch_size", "'12.5'", "expected a int"]),
        ("tensorboard", "maybe", ["expected a boolean"]),
    ],
)
def test_bad_overrides_are_named(key, value, words):
    with pytest.raises(ConfigError) as error:
        apply_overrides(cifar_recipe("resnet20"), [(key, value)])
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"model.name": "resnet21"}, ["model.name", "6n+2"]),
        ({"model.shortcut": "D"}, ["model.shortcut", "'D'", "'A', 'B' or 'C'"]),
        ({"dataset.name": "imagenet"}, ["dataset.name", "cifar10, cifar100, mnist, fashion_mnist"]),
        ({"batch_size": 100}, ["batch_size", "100", "multiple of the device count (8)"]),
        ({"learning_rate": -0.1}, ["learning_rate", "(0, 10]"]),
        ({"num_train_steps": 0}, ["num_train_steps", ">= 1"]),
        ({"dataset.eval_split": "holdout_validation"}, ["train_split", "holdout_train"]),
        ({"steps_per_dispatch": 3}, ["multiple of steps_per_dispatch (3)"]),
        ({"bn_group_size": 48}, ["bn_group_size", "divisor of batch_size (128)"]),
    ],
)
def test_invalid_configs_are_refused_with_key_value_and_accepted(changes, words):
    config = cifar_recipe("resnet20")
    apply_overrides(config, [(k, str(v)) for k, v in changes.items()])
    with pytest.raises(ConfigError) as error:
        validate(config, num_devices=8)
    for word in words:
        assert word in str(error.value)


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True)


def test_train_cli_refuses_bad_input_in_one_paragraph_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    cases = [
        (["--config.modle.name=resnet8"], "did you mean 'model.name'"),
        (["--config.batch_size=0"], "batch_size"),
        (["--config.dataset.data_dir=" + str(tmp_path / "nowhere")], "nowhere"),
    ]
    for flags, words in cases:
        out = run_cli(
            "train.py", "--config=configs/fashion_mnist_resnet20.py", f"--workdir={workdir}", *flags
        )
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error: ") and words in out.stderr
        assert "Traceback" not in out.stderr
        assert not workdir.exists()


def test_evaluate_cli_on_a_directory_that_is_no_run(tmp_path):
    out = run_cli("evaluate.py", f"--workdir={tmp_path}")
    assert out.returncode == 2 and "not a workdir written by train.py" in out.stderr
