"""Configs: the recipes, command-line overrides, and refusals before anything runs."""

import subprocess
import sys
from pathlib import Path

import pytest

from resnet_jax import config as config_lib
from resnet_jax import installs
from resnet_jax.config import ConfigError, apply_overrides, cifar_recipe, imagenet_recipe, validate
from resnet_jax.state import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
PAPER_CONFIGS = [f"cifar.py:{kind}{d},cifar10" for kind in ("resnet", "plain") for d in CIFAR_DEPTHS]
IMAGENET_CONFIGS = [
    *(f"imagenet.py:{m}" for m in ("resnet18", "resnet50", "resnet101", "resnet152", "plain18", "plain34")),
    "imagenet.py:resnet34,A", "imagenet.py:resnet34,B", "imagenet.py:resnet34,C", "imagenet.py:resnet18,B",
    "imagenet_pod.py:resnet50", "imagenet_pod.py:resnet101,1024",
]
# The paper's nets and their shortcut options ("none": a plain net), from its text: every
# CIFAR net has option A (Sec. 4.2; Table 6, Figure 6); Table 2 / Figure 4 use A on all
# shortcuts (Sec. 4.1); Table 3 compares A/B/C on ResNet-34 and uses B for the deeper nets,
# as Table 4 does.
PAPER_TABLES = {
    "Table 6": {f"cifar.py:resnet{d},cifar10": "A" for d in (*CIFAR_DEPTHS, 1202)},
    "Figure 6": {f"cifar.py:{kind}{d},cifar10": "A" if kind == "resnet" else "none"
                 for kind in ("resnet", "plain") for d in CIFAR_DEPTHS},
    "Table 2": {"imagenet.py:plain18": "none", "imagenet.py:plain34": "none",
                "imagenet.py:resnet18": "A", "imagenet.py:resnet34,A": "A"},
    "Table 3": {"imagenet.py:plain34": "none", "imagenet.py:resnet34,A": "A", "imagenet.py:resnet34,B": "B",
                "imagenet.py:resnet34,C": "C", "imagenet.py:resnet50": "B", "imagenet.py:resnet101": "B",
                "imagenet.py:resnet152": "B"},
    "Table 4": {"imagenet.py:resnet34,B": "B", "imagenet.py:resnet34,C": "C", "imagenet.py:resnet50": "B",
                "imagenet.py:resnet101": "B", "imagenet.py:resnet152": "B"},
}


def load(name):
    return config_lib.load(f"{CONFIGS}/{name}")


def shortcut_of(config):
    """The shortcut option of the net a config builds ("none" for a plain net)."""
    model = build_model(config)
    return model.shortcut if model.residual else "none"


@pytest.mark.parametrize(
    "name", ["cifar10_resnet20.py", "fashion_mnist_resnet20.py", "fashion_mnist_resnet20_short.py",
             "cifar.py:resnet1202,cifar10", "cifar.py:resnet56,fashion_mnist", "cifar.py:plain20,cifar100",
             "cifar.py:resnet8",
             *PAPER_CONFIGS, *IMAGENET_CONFIGS]
)
def test_every_config_file_loads_and_validates(name):
    config = load(name)
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


@pytest.mark.parametrize("table", PAPER_TABLES)
def test_every_config_of_a_paper_table_has_the_papers_shortcut(table):
    for name, shortcut in PAPER_TABLES[table].items():
        assert shortcut_of(load(name)) == shortcut, (table, name)


def test_the_library_lists_the_papers_imagenet_nets_with_their_shortcuts():
    listed = {
        table: {f"imagenet.py:{m}" + (f",{s}" if m == "resnet34" else ""): s or "none" for m, s in nets}
        for table, nets in config_lib.PAPER_IMAGENET_NETS.items()
    }
    assert listed == {table: PAPER_TABLES[table] for table in ("Table 2", "Table 3", "Table 4")}


def test_the_short_configs_are_their_recipes():
    assert config_lib.to_dict(load("cifar10_resnet20.py")) == config_lib.to_dict(
        load("cifar.py:resnet20,cifar10"))
    assert config_lib.to_dict(load("fashion_mnist_resnet20.py")) == config_lib.to_dict(
        load("cifar.py:resnet20,fashion_mnist"))


def test_the_make_train_config_is_the_fashion_mnist_recipe_on_2000_steps():
    short, full = load("fashion_mnist_resnet20_short.py"), load("cifar.py:resnet20,fashion_mnist")
    assert config_lib.differences(full, short) == ["num_train_steps: 64000 != 2000"]
    assert [round(f * short.num_train_steps) for f in short.lr_boundaries] == [1000, 1500]
    assert (short.eval_every_steps, short.checkpoint_every_steps) == (500, 500)


@pytest.mark.parametrize("name, debian_dir_exists, items", [
    ("fashion_mnist_resnet20_short.py", False, ["deb:dataset-fashion-mnist"]),
    ("fashion_mnist_resnet20_short.py", True, []),
    ("cifar10_resnet20.py", False, ["extra:tfds", "extra:tfds-prepare"]),
    ("imagenet.py:resnet50", False, ["extra:tfds", "extra:stream"]),
])
def test_make_train_installs_what_a_config_reads(name, debian_dir_exists, items):
    assert installs.needed(load(name), debian_dir_exists) == items


def test_a_config_reading_local_files_needs_nothing_installed(tmp_path):
    for name in ("fashion_mnist_resnet20.py", "cifar10_resnet20.py"):
        config = load(name)
        config.dataset.data_dir = str(tmp_path)
        assert installs.needed(config, debian_dir_exists=False) == []
    config = load("imagenet.py:resnet50")
    config.dataset.name, config.dataset.data_dir = "image_folder", str(tmp_path)
    assert installs.needed(config, debian_dir_exists=False) == ["extra:stream"]
    config.dataset.loader = "dali"
    assert installs.needed(config, debian_dir_exists=False) == ["extra:dali"]


@pytest.mark.parametrize("old, new, shortcut", [
    ("cifar10_resnet110.py", "cifar.py:resnet110,cifar10", "A"),
    ("fashion_mnist_plain56.py", "cifar.py:plain56,fashion_mnist", "none"),
    ("cifar100_resnet1202.py", "cifar.py:resnet1202,cifar100", "A"),
    ("imagenet_resnet18.py", "imagenet.py:resnet18,B", "B"),  # what the old file built
    ("imagenet_resnet34_a.py", "imagenet.py:resnet34,A", "A"),
    ("imagenet_resnet152.py", "imagenet.py:resnet152,B", "B"),
    ("imagenet_plain34.py", "imagenet.py:plain34", "none"),
    ("imagenet_resnet50_pod.py", "imagenet_pod.py:resnet50", "B"),
])
def test_a_missing_config_named_after_a_net_and_dataset_names_the_recipe_files_form(old, new, shortcut):
    with pytest.raises(ConfigError) as error:
        load(old)
    assert f"--config={CONFIGS}/{new}" in str(error.value)
    assert shortcut_of(load(new)) == shortcut


@pytest.mark.parametrize("typo, nearest", [
    ("fashion_mnist_resnet2.py", "fashion_mnist_resnet20.py"),  # resnet2 is no net: no recipe form
    ("fashion_mnist_resnet20_shrt.py", "fashion_mnist_resnet20_short.py"),
    ("cifar10_resnet50.py", "cifar10_resnet20.py"),  # ResNet-50 is an ImageNet net
    ("imagenet_pod.py.py", "imagenet_pod.py"),
])
def test_a_mistyped_config_file_is_refused_naming_the_existing_file_nearest_it(typo, nearest):
    with pytest.raises(ConfigError) as error:
        load(typo)
    message = str(error.value)
    assert message == f"config file '{CONFIGS}/{typo}' does not exist; did you mean {CONFIGS}/{nearest}?"
    assert (CONFIGS / nearest).is_file()


@pytest.mark.parametrize("name, words", [
    ("cifar.py", ["configs/cifar.py takes MODEL[,DATASET]", "got None"]),
    ("cifar.py:resnet20,cifar10,A", ["MODEL[,DATASET]", "'resnet20,cifar10,A'"]),
    ("cifar.py:resnet50", ["cifar family", "--config=configs/imagenet.py:resnet50"]),
    ("cifar.py:resnet20,imagenet", ["'imagenet'", "cifar10, cifar100, mnist, fashion_mnist"]),
    ("imagenet.py:resnet20", ["imagenet family", "--config=configs/cifar.py:resnet20"]),
    ("imagenet.py:resnet34", ["A in Table 2, Table 3; B in Table 3, Table 4; C in Table 3, Table 4",
                              "configs/imagenet.py:resnet34,A"]),
    ("imagenet.py:resnet50,D", ["'D'", "A, B or C"]),
    ("imagenet.py:plain34,A", ["'A'", "none after a plain one"]),
    ("imagenet_pod.py:resnet50,big", ["'big'", "a positive integer"]),
    ("cifar10_resnet20.py:resnet56", ["takes no argument after ':'", "'resnet56'"]),
    ("nothing.py", ["does not exist", "configs/cifar.py:resnet110,cifar10"]),
])
def test_bad_recipe_arguments_are_named_with_what_is_accepted(name, words):
    with pytest.raises(ConfigError) as error:
        load(name)
    for word in words:
        assert word in str(error.value)


def test_the_paper_recipe():
    config = load("cifar10_resnet20.py")
    assert (config.model.name, config.dataset.name) == ("resnet20", "cifar10")
    assert (config.batch_size, config.num_train_steps, config.learning_rate) == (128, 64_000, 0.1)
    assert (config.momentum, config.weight_decay, config.lr_warmup) == (0.9, 1e-4, "none")
    assert config.weight_decay_on == "all"  # the paper's Caffe setup decayed every parameter
    assert [round(f * 64_000) for f in config.lr_boundaries] == [32_000, 48_000]
    assert (config.dataset.augment, config.dataset.crop_padding) == ("pad_crop_flip", 4)
    assert config.dataset.normalization == "per_pixel_mean"


def test_the_paper_imagenet_recipe():
    config = load("imagenet.py:resnet34,A")
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
    config = load("imagenet_pod.py:resnet50")
    assert config.learning_rate == pytest.approx(0.1 * config.batch_size / 256)
    epochs = config.num_train_steps * config.batch_size / config_lib.IMAGENET_TRAIN_EXAMPLES
    assert epochs == pytest.approx(90, abs=0.01)
    assert config.lr_warmup == "linear" and config.lr_warmup_fraction * epochs == pytest.approx(5, abs=1e-3)
    assert (config.lr_schedule, config.label_smoothing, config.model.dtype) == ("cosine", 0.1, "bfloat16")
    assert config.model.zero_init_residual and config.dataset.augment == "random_resized_crop"
    assert config.weight_decay_on == "kernels"  # Goyal et al.: BN's scales and offsets undecayed
    # BN statistics over groups of 32 examples (Goyal et al.'s per GPU), from 8 GPUs (512
    # examples each: 16 groups per device) to 256 devices (16 examples each: a group spans 2).
    assert config.bn_group_size == 32 and build_model(config).bn_group_size == 32
    for devices in (1, 8, 128, 256):
        validate(config, num_devices=devices)


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
        ("batch_size", "12.5", ["batch_size", "'12.5'", "expected an int (current value 128)"]),
        ("learning_rate", "fast", ["learning_rate", "'fast'", "expected a float"]),
        ("tensorboard", "maybe", ["expected a boolean"]),
    ],
)
def test_bad_overrides_are_named(key, value, words):
    with pytest.raises(ConfigError) as error:
        apply_overrides(cifar_recipe("resnet20"), [(key, value)])
    for word in words:
        assert word in str(error.value)


def test_an_unknown_key_is_refused_with_the_few_nearest_keys_not_all_of_them():
    config = cifar_recipe("resnet20")
    with pytest.raises(ConfigError) as error:
        apply_overrides(config, [("modle.name", "resnet8")])
    message = str(error.value)
    assert message.startswith("unknown config key 'modle.name'; did you mean 'model.name'? Other near keys: ")
    assert message.endswith(" Every key and what it means: docs/training.md")
    named = [key for key in config_lib.flat_keys(config) if f"'{key}'" in message]
    assert "model.name" in named and len(named) <= config_lib.NEAREST_KEYS
    with pytest.raises(ConfigError, match=r"'zzzz'; no key is near it\. Every key and what it means"):
        apply_overrides(config, [("zzzz", "1")])


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"model.name": "resnet21"}, ["model.name", "6n+2"]),
        ({"model.shortcut": "D"}, ["model.shortcut", "'D'", "'A', 'B' or 'C'"]),
        ({"model.conv": "native"}, ["model.conv", "'native'", "auto, xla (", "CPU backend"]),
        ({"dataset.name": "imagenet"}, ["dataset.name", "cifar10, cifar100, mnist, fashion_mnist"]),
        ({"batch_size": 100}, ["batch_size", "100", "multiple of the device count (8)"]),
        ({"learning_rate": -0.1}, ["learning_rate", "(0, 10]"]),
        ({"num_train_steps": 0}, ["num_train_steps", ">= 1"]),
        ({"dataset.eval_split": "holdout_validation"}, ["train_split", "holdout_train"]),
        ({"steps_per_dispatch": 3}, ["multiple of steps_per_dispatch (3)"]),
        ({"bn_group_size": 48}, ["bn_group_size", "divisor of batch_size (128)"]),
        ({"dataset.loader": "dali"}, ["dataset.loader", "'grain' for cifar10, which lives on the devices",
                                      "image_folder, imagenet2012, imagenette"]),
        ({"batch_size": 96, "bn_group_size": 8}, ["bn_group_size", "per-device batch (96 / 8 devices = 12"]),
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
        ({"dataset.num_workers": -2}, ["dataset.num_workers", "-1 (the CPUs this process may use"]),
        ({"dataset.eval_workers": -1}, ["dataset.eval_workers", "-1", "0 (evaluation decodes in the main",
                                        "at most dataset.num_workers"]),
        ({"dataset.read_threads": 0}, ["dataset.read_threads", "an integer >= 1"]),
        ({"dataset.read_buffer_size": 1}, ["dataset.read_buffer_size", ">= dataset.read_threads (2)"]),
        ({"dataset.worker_buffer_size": 0}, ["dataset.worker_buffer_size", "an integer >= 1"]),
        ({"dataset.prefetch_batches": 0}, ["dataset.prefetch_batches", ">= 1"]),
        ({"dataset.loader": "tf.data"}, ["dataset.loader", "'tf.data'", "'grain' (the default",
                                         "'dali' (decoding on NVIDIA GPUs, pip install -e '.[dali]')"]),
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


def _changed(value):
    """Another value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (*value, 1)
    return value + 1


def test_the_fingerprint_and_the_resume_check_leave_out_exactly_the_keys_marked_logistics():
    assert config_lib.LOGISTICS_KEYS == {
        "eval_every_steps", "checkpoint_every_steps", "log_every_steps", "keep_checkpoints", "tensorboard",
        "eval_batch_size", "dataset.data_dir", "dataset.num_workers", "dataset.prefetch_batches",
        "dataset.read_threads", "dataset.read_buffer_size", "dataset.worker_buffer_size",
        "dataset.eval_workers",
        "dataset.loader",  # the same images and views through Grain or DALI, to the resampler's rounding
        "compilation_cache_dir",
        "model.conv",  # the CPU's convolution path: the same results to float rounding on each
    }
    base = cifar_recipe("resnet20")
    for key, value in config_lib.flat_keys(base).items():
        changed = cifar_recipe("resnet20")
        group, _, leaf = key.rpartition(".")
        (changed[group] if group else changed)[leaf] = _changed(value)
        logistics = key in config_lib.LOGISTICS_KEYS
        assert (config_lib.fingerprint(changed) == config_lib.fingerprint(base)) == logistics, key
        assert config_lib.differences(base, changed) == ([] if logistics else [
            f"{key}: {value!r} != {_changed(value)!r}"]), key


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
