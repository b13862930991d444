"""Run configurations: the paper's recipes, config files, command-line overrides, checks.

A config is an `ml_collections.ConfigDict`. Files under `configs/` define `get_config()`;
`--config.KEY=VALUE` overrides any existing key (nested with dots), parsed as the type
the key already has. Every check here runs before anything is compiled or written.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections

from resnet_jax.data.sources import DATASETS, SPLITS
from resnet_jax.models import SHORTCUTS, model_spec
from resnet_jax.schedules import SCHEDULES, WARMUPS, WEIGHT_DECAY_ON

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# The paper's CIFAR schedule (Sec. 4.2), whose boundaries the fractions below come from.
PAPER_CIFAR_STEPS = 64_000
AUGMENTATIONS = ("pad_crop_flip", "none")
NORMALIZATIONS = ("per_pixel_mean", "per_channel_mean_std")
DTYPES = ("float32", "bfloat16", "float16")
# Keys that change how a run is logged or saved, not what it computes: a resumed run may
# change them without being "a different run".
LOGISTICS_KEYS = (
    "eval_every_steps", "checkpoint_every_steps", "log_every_steps", "keep_checkpoints",
    "tensorboard", "dataset.data_dir", "eval_batch_size",
)


class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the value and what is accepted."""


def cifar_recipe(model: str, dataset: str = "cifar10") -> ml_collections.ConfigDict:
    """The paper's CIFAR-10 recipe (Sec. 4.2) for `model`, on `dataset`.

    Batch 128, SGD momentum 0.9, weight decay 1e-4, learning rate 0.1 divided by 10 at
    32k and 48k iterations, 64k iterations, pad-4 random crop and flip, per-pixel mean
    subtraction; ResNet-110 and deeper warm up at 0.01 for the first 400 iterations.
    """
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        dict(name=model, shortcut="", stride_in_1x1=False, zero_init_residual=False, dtype="float32")
    )
    data_dir = ""
    if dataset == "fashion_mnist" and os.path.isdir(FASHION_MNIST_DEBIAN_DIR):
        data_dir = FASHION_MNIST_DEBIAN_DIR  # Debian's dataset-fashion-mnist: no download
    config.dataset = ml_collections.ConfigDict(
        dict(
            name=dataset, data_dir=data_dir,
            # "holdout_train" / "holdout_validation" give the paper's 45k/5k split.
            train_split="train", eval_split="test",
            augment="pad_crop_flip", crop_padding=4, normalization="per_pixel_mean",
        )
    )
    config.batch_size = 128
    config.eval_batch_size = 512
    config.num_train_steps = PAPER_CIFAR_STEPS
    config.learning_rate = 0.1
    config.lr_schedule = "piecewise"
    config.lr_boundaries = (32_000 / PAPER_CIFAR_STEPS, 48_000 / PAPER_CIFAR_STEPS)
    config.lr_decay_factor = 0.1
    deep = model_spec(model)["depth"] >= 110
    config.lr_warmup = "constant" if deep else "none"
    config.lr_warmup_fraction = 400 / PAPER_CIFAR_STEPS if deep else 0.0
    config.lr_warmup_value = 0.01 if deep else 0.0
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    config.weight_decay_on = "kernels"
    config.label_smoothing = 0.0
    # Examples per BatchNorm statistics group; 0: the whole global batch. The paper's
    # two-GPU CIFAR runs normalised over 64 examples each.
    config.bn_group_size = 0
    config.steps_per_dispatch = 1
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
    config.log_every_steps = 100
    config.keep_checkpoints = 3
    config.seed = 0
    config.tensorboard = True
    return config


def load(path: str | os.PathLike[str]) -> ml_collections.ConfigDict:
    """The config that the file at `path` returns from `get_config()`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass one of configs/*.py")
    spec = importlib.util.spec_from_file_location(f"resnet_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {str(path)!r} defines no get_config()")
        return module.get_config()
    except ConfigError:
        raise
    except Exception as error:  # the user's file: report where, not a traceback into it
        raise ConfigError(f"config file {str(path)!r} failed: {type(error).__name__}: {error}") from None


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{"model.name": "resnet20", ...}: every leaf of the config with its dotted key."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _parse(key: str, text: str, current: Any) -> Any:
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"--config.{key}={text!r}: expected {expected} (current value {current!r})")

    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise fail("a boolean: true or false")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise fail(f"a {type(current).__name__}") from None
    if isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(current, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, tuple | list):
        return tuple(value)
    raise fail(f"a {type(current).__name__}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[tuple[str, str]]) -> None:
    """Set each (dotted key, text) pair; unknown keys are refused with the nearest name."""
    known = flat_keys(config)
    for key, text in overrides:
        if key not in known:
            raise ConfigError(
                f"unknown config key {key!r}{_nearest(key, known)} Keys: {', '.join(sorted(known))}"
            )
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = _parse(key, text, known[key])


def _require(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key} = {value!r} is not accepted; expected {accepted}")


def _nearest(key: str, keys: Iterable[str]) -> str:
    nearest = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.5)
    return f"; did you mean {nearest[0]!r}?" if nearest else ""


def _check_schema(config: ml_collections.ConfigDict) -> None:
    """Every key of the recipe present, no other, each with the recipe's type (ints pass
    for floats): a config file's typo or a quoted number is caught before anything runs."""
    schema, given = flat_keys(cifar_recipe("resnet20")), flat_keys(config)
    for key in sorted(set(given) - set(schema)):
        raise ConfigError(
            f"unknown config key {key!r}{_nearest(key, schema)} Keys: {', '.join(sorted(schema))}"
        )
    for key in sorted(set(schema) - set(given)):
        raise ConfigError(f"config key {key!r} is missing; every config has it (default: {schema[key]!r})")
    for key, value in given.items():
        expected = type(schema[key])
        if expected is float and type(value) is int:
            continue
        if type(value) is not expected:
            raise ConfigError(
                f"config.{key} = {value!r} is a {type(value).__name__}; expected a {expected.__name__}"
            )


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Refuse, with the key, the value and what is accepted, a config that cannot run."""
    _check_schema(config)
    try:
        spec = model_spec(config.model.name)
    except ValueError as error:
        raise ConfigError(f"config.model.name: {error}") from None
    _require(config.model.shortcut in ("", *SHORTCUTS), "model.shortcut", config.model.shortcut,
             "'' (the family's default), 'A', 'B' or 'C'")
    _require(not (config.model.shortcut and not spec["residual"]), "model.shortcut",
             config.model.shortcut, "'' for a plain net, which has no shortcuts")
    _require(not (config.model.zero_init_residual and not spec["residual"]),
             "model.zero_init_residual", True, "False for a plain net")
    _require(config.model.dtype in DTYPES, "model.dtype", config.model.dtype, " or ".join(DTYPES))
    _require(config.dataset.name in DATASETS, "dataset.name", config.dataset.name,
             ", ".join(DATASETS))
    for key in ("train_split", "eval_split"):
        value = config.dataset[key]
        _require(value in SPLITS, f"dataset.{key}", value, ", ".join(SPLITS))
    _require(config.dataset.eval_split != "holdout_validation"
             or config.dataset.train_split == "holdout_train", "dataset.train_split",
             config.dataset.train_split,
             "'holdout_train' when evaluating on 'holdout_validation' (else it trains on it)")
    _require(config.dataset.augment in AUGMENTATIONS, "dataset.augment", config.dataset.augment,
             ", ".join(AUGMENTATIONS))
    _require(config.dataset.crop_padding >= 0, "dataset.crop_padding", config.dataset.crop_padding,
             "an integer >= 0")
    _require(config.dataset.normalization in NORMALIZATIONS, "dataset.normalization",
             config.dataset.normalization, ", ".join(NORMALIZATIONS))
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        _require(value > 0 and value % num_devices == 0, key, value,
                 f"a positive multiple of the device count ({num_devices})")
    for key in ("num_train_steps", "eval_every_steps", "checkpoint_every_steps", "log_every_steps",
                "keep_checkpoints", "steps_per_dispatch"):
        _require(config[key] >= 1, key, config[key], "an integer >= 1")
    for key in ("num_train_steps", "eval_every_steps", "checkpoint_every_steps", "log_every_steps"):
        _require(config[key] % config.steps_per_dispatch == 0, key, config[key],
                 f"a multiple of steps_per_dispatch ({config.steps_per_dispatch})")
    _require(0 < config.learning_rate <= 10, "learning_rate", config.learning_rate,
             "a number in (0, 10]")
    _require(config.lr_schedule in SCHEDULES, "lr_schedule", config.lr_schedule, ", ".join(SCHEDULES))
    _require(all(0 < f < 1 for f in config.lr_boundaries), "lr_boundaries", config.lr_boundaries,
             "fractions of num_train_steps, each in (0, 1)")
    _require(config.lr_warmup in WARMUPS, "lr_warmup", config.lr_warmup, ", ".join(WARMUPS))
    _require(0 <= config.lr_warmup_fraction < 1, "lr_warmup_fraction", config.lr_warmup_fraction,
             "a fraction of num_train_steps in [0, 1)")
    _require(0 <= config.momentum < 1, "momentum", config.momentum, "a number in [0, 1)")
    _require(config.weight_decay >= 0, "weight_decay", config.weight_decay, "a number >= 0")
    _require(config.weight_decay_on in WEIGHT_DECAY_ON, "weight_decay_on", config.weight_decay_on,
             ", ".join(WEIGHT_DECAY_ON))
    _require(0 <= config.label_smoothing < 1, "label_smoothing", config.label_smoothing,
             "a number in [0, 1)")
    group = config.bn_group_size
    per_device = config.batch_size // num_devices
    _require(group == 0 or (group > 0 and config.batch_size % group == 0), "bn_group_size", group,
             f"0 (whole batch) or a divisor of batch_size ({config.batch_size})")
    _require(group == 0 or per_device % group == 0 or group % per_device == 0, "bn_group_size", group,
             f"a divisor or multiple of the per-device batch ({per_device}), so groups align with devices")


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """A hash of everything that decides what a run computes (not its logistics)."""
    flat = {k: v for k, v in flat_keys(config).items() if k not in LOGISTICS_KEYS}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=list).encode()).hexdigest()[:16]


def differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> list[str]:
    """'key: a_value != b_value' for each computing key where two configs differ."""
    fa, fb = flat_keys(a), flat_keys(b)
    keys = sorted((set(fa) | set(fb)) - set(LOGISTICS_KEYS))
    return [f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in keys if fa.get(k) != fb.get(k)]


def from_dict(values: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config read back from `config.json` (lists become the tuples they were)."""
    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            return ml_collections.ConfigDict({k: restore(v) for k, v in value.items()})
        return tuple(value) if isinstance(value, list) else value

    return restore(values)
