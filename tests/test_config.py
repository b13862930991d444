"""Configs: the recipes, command-line overrides, and refusals before anything runs."""

import subprocess
import sys
from pathlib import Path

import pytest

from resnet_jax import config as config_lib
from resnet_jax.config import ConfigError, apply_overrides, cifar_recipe, imagenet_recipe, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = [f"cifar10_{kind}{d}" for kind in ("resnet", "plain") for d in (20, 32, 44, 56, 110)]
IMAGENET_CONFIGS = [
    *(f"imagenet_{m}" for m in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")),
    "imagenet_plain18", "imagenet_plain34",
    "imagenet_resnet34_a", "imagenet_resnet34_b", "imagenet_resnet34_c", "imagenet_resnet50_pod",
]


@pytest.mark.parametrize(
    "name", ["default", "cifar10_resnet1202", "fashion_mnist_resnet56", "cifar100_plain20", *PAPER_CONFIGS,
             *IMAGENET_CONFIGS]
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
    assert config.weight_decay_on == "all"  # the paper's Caffe setup decayed every parameter
    assert [round(f * 64_000) for f in config.lr_boundaries] == [32_000, 48_000]
    assert (config.dataset.augment, config.dataset.crop_padding) == ("pad_crop_flip", 4)
    assert config.dataset.normalization == "per_pixel_mean"


def test_the_paper_imagenet_recipe():
    config = config_lib.load(REPO_ROOT / "configs" / "imagenet_resnet34_a.py")
    assert (config.model.name, config.model.shortcut) == ("resnet34", "A")
    assert config.dataset.name == "imagenet2012"
    assert (config.batch_size, config.num_train_steps, config.learning_rate) == (256, 600_000, 0.1)
    assert (config.momentum, config.weight_decay, config.lr_schedule) == (0.9, 1e-4, "piecewise")
    assert config.weight_decay_on == "all"
    assert [round(f * 600_000) for f in config.lr_boundaries] == [150_000, 300_000]
    assert (config.dataset.augment, config.dataset.scale_range, config.dataset.image_size) == (
        "scale_crop_flip", (256, 480), 224)
    assert (config.dataset.lighting_std, config.dataset.normalization) == (0.1, "per_pixel_mean")
    assert config.dataset.multi_scale_sizes == (224, 256, 384, 480, 640) and config.dataset.eval_resize == 256


def test_the_pod_recipe_scales_the_learning_rate_and_warms_up_for_five_epochs():
    config = config_lib.load(REPO_ROOT / "configs" / "imagenet_resnet50_pod.py")
    assert config.learning_rate == pytest.approx(0.1 * config.batch_size / 256)
    epochs = config.num_train_steps * config.batch_size / config_lib.IMAGENET_TRAIN_EXAMPLES
    assert epochs == pytest.approx(90, abs=0.01)
    assert config.lr_warmup == "linear" and config.lr_warmup_fraction * epochs == pytest.approx(5, abs=1e-3)
    assert (config.lr_schedule, config.label_smoothing, config.model.dtype) == ("cosine", 0.1, "bfloat16")
    assert config.model.zero_init_residual and config.dataset.augment == "random_resized_crop"
    assert config.weight_decay_on == "kernels"  # Goyal et al.: BN's scales and offsets undecayed


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


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"dataset.augment": "pad_crop_flip"},
         ["dataset.augment", "scale_crop_flip, random_resized_crop, none"]),
        ({"dataset.eval_split": "test"}, ["dataset.eval_split", "for imagenet2012: train, validation"]),
        ({"dataset.scale_range": (200, 480)}, ["dataset.scale_range", "image_size (224) <= low <= high"]),
        ({"dataset.scale_range": (256, 480, 512)}, ["dataset.scale_range", "a pair of ints"]),
        ({"dataset.area_range": (0.5, 0.1)}, ["dataset.area_range", "0 < low <= high <= 1"]),
        ({"dataset.aspect_ratio_range": (0.0, 1.0)}, ["aspect_ratio_range", "0 < low <= high"]),
        ({"dataset.lighting_std": -0.1}, ["dataset.lighting_std", ">= 0"]),
        ({"dataset.eval_resize": 200}, ["dataset.eval_resize", ">= image_size (224)"]),
        ({"dataset.multi_scale_sizes": ()}, ["multi_scale_sizes", "non-empty tuple"]),
        ({"dataset.num_classes": 10}, ["dataset.num_classes", "0 or 1000 for imagenet2012"]),
        ({"dataset.num_workers": -2}, ["dataset.num_workers", "-1 (one per CPU core)"]),
        ({"dataset.prefetch_batches": 0}, ["dataset.prefetch_batches", ">= 1"]),
        ({"steps_per_dispatch": 2}, ["steps_per_dispatch", "1 for a streamed dataset"]),
        ({"dataset.name": "image_folder"}, ["dataset.data_dir", "train/<class>/*"]),
    ],
)
def test_invalid_imagenet_configs_are_refused_with_key_value_and_accepted(changes, words):
    config = imagenet_recipe("resnet50")
    for key, value in changes.items():
        group, _, leaf = key.rpartition(".")
        (config[group] if group else config)[leaf] = value
    with pytest.raises(ConfigError) as error:
        validate(config, num_devices=8)
    for word in words:
        assert word in str(error.value)


def test_a_config_json_written_before_keys_were_added_reads_back_with_their_defaults():
    old = config_lib.to_dict(cifar_recipe("resnet20"))
    for key in ("num_classes", "image_size", "lighting_std", "num_workers", "skip_unreadable"):
        del old["dataset"][key]
    restored = config_lib.from_dict(old)
    assert config_lib.fingerprint(restored) == config_lib.fingerprint(cifar_recipe("resnet20"))
    assert restored.dataset.image_size == 224 and restored.dataset.num_workers == -1


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
