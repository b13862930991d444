"""Run configurations: the paper's recipes, config files, command-line overrides, checks.

A config is an `ml_collections.ConfigDict`. Files under `configs/` define `get_config()`,
one file per recipe family, and `FILE:ARG` passes ARG to `get_config(ARG)`
(`configs/cifar.py:resnet110,cifar10`), as ml_collections' config flags do.
`--config.KEY=VALUE` overrides any existing key (nested with dots), parsed as the type
the key already has. Every check here runs before anything is compiled or written.

Why overrides have their own parser rather than `ml_collections.config_flags`: config
flags are absl flags, defined once per process for one config file, while the commands
here are argparse programs (the experiments apply the same overrides to every run's config,
built in code, and a run trained in a subprocess to a config read from JSON), and a user's
mistake must end in one paragraph, exit status 2. With config flags (ml_collections 1.1)
a mistyped top-level key ends in a traceback ending `AttributeError: "'learning_rte'"`, a
mistyped nested key in a traceback whose KeyError suggests the name, and a wrong type in
absl's "Flags parsing error"; here each is one `ConfigError` naming the key, the nearest
known key, the value and the type expected. Both parse a tuple from `(a, b)` text and
neither can set a key whose default is None (no key here has one).

Keys of how a run is logged, saved, fed or run on the CPU are marked `Logistics` where the schema defines
them; the fingerprint (what decides that a workdir holds "the same run") and the resume
check both read `LOGISTICS_KEYS`, which is derived from those marks.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections

from resnet_jax.backend import CONV_PATHS
from resnet_jax.data.dali import INSTALL as DALI_INSTALL
from resnet_jax.data.image_records import STREAM_SPLITS, STREAMED_DATASETS, STREAMED_NUM_CLASSES
from resnet_jax.data.sources import DATASETS, SPLITS, num_classes
from resnet_jax.models import SHORTCUTS, model_spec
from resnet_jax.schedules import SCHEDULES, WARMUPS, WEIGHT_DECAY_ON

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# The paper's CIFAR schedule (Sec. 4.2), whose boundaries the fractions below come from.
PAPER_CIFAR_STEPS = 64_000
# The paper's ImageNet schedule (Sec. 3.4): 60e4 iterations of 256 images.
PAPER_IMAGENET_STEPS = 600_000
IMAGENET_TRAIN_EXAMPLES = 1_281_167
# The pod recipe's examples per BN statistics group: Goyal et al.'s 32 images per GPU.
POD_BN_GROUP_SIZE = 32
# Small datasets are augmented on the device, streamed ones on the host: each has its own.
IN_MEMORY_AUGMENTATIONS = ("pad_crop_flip", "none")
STREAMED_AUGMENTATIONS = ("scale_crop_flip", "random_resized_crop", "none")
# What decodes streamed datasets: Grain's host workers, or DALI on NVIDIA GPUs (data/dali.py).
LOADERS = ("grain", "dali")
NORMALIZATIONS = ("per_pixel_mean", "per_channel_mean_std")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the value and what is accepted."""


@dataclasses.dataclass(frozen=True)
class Logistics:
    """Marks a default in `_marked_schema` whose key is logistics: it changes how a run is
    logged, saved, fed or run on the CPU, not what it computes, so the fingerprint leaves it out and a
    resumed run may change it. `LOGISTICS_KEYS` is read from these marks."""

    default: Any


def base_config(model: str = "resnet20", dataset: str = "cifar10") -> ml_collections.ConfigDict:
    """Every key a config has, with its default: the schema every config is checked against,
    and what a `config.json` written before a key existed is read back with.

    The defaults are the paper's CIFAR recipe (Sec. 4.2), and for the keys only streamed
    datasets read (image sizes, scale augmentation, evaluation crops) the paper's ImageNet
    sizes (Sec. 3.4); lighting is off.
    """
    return _unmarked(_marked_schema(model, dataset))


def _unmarked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        key: _unmarked(value) if isinstance(value, ml_collections.ConfigDict)
        else value.default if isinstance(value, Logistics) else value
        for key, value in config.items()
    })


def _marked_schema(model: str = "resnet20", dataset: str = "cifar10") -> ml_collections.ConfigDict:
    """`base_config` with each logistics key's default wrapped in `Logistics`."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        dict(
            name=model, shortcut="", stride_in_1x1=False, zero_init_residual=False, dtype="float32",
            # On the CPU backend only: how convolutions and their gradients run (see
            # resnet_jax/cpu/fast_conv.py); the same results to float rounding on each path.
            conv=Logistics("auto"),
        )
    )
    config.dataset = ml_collections.ConfigDict(
        dict(
            name=dataset, data_dir=Logistics(""),
            # "holdout_train" / "holdout_validation" give the paper's 45k/5k split.
            train_split="train", eval_split="test",
            augment="pad_crop_flip", crop_padding=4, normalization="per_pixel_mean",
            # 0: the dataset's own class count (for image_folder: its class folders).
            num_classes=0,
            # Streamed datasets only: the side of training crops and of center crops; the
            # shorter side's range for "scale_crop_flip"; the area fraction and aspect
            # ratio ranges of "random_resized_crop"; AlexNet PCA lighting's std (0: off);
            # evaluation's resize before center and ten crops; multi-scale's shorter sides.
            image_size=224, scale_range=(256, 480), area_range=(0.08, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3), lighting_std=0.0, eval_resize=256,
            multi_scale_sizes=(224, 256, 384, 480, 640),
            # An unreadable image: an error naming it (False), or skipped and counted (True).
            skip_unreadable=False,
            # Decoding processes per host (-1: the CPUs this process may use, divided among
            # the training processes on the host; 0: in the main process) and batches
            # transferred ahead to the devices by a background thread. Workers stack examples
            # into pieces of up to 32 (`stream.PIECE`); each reads with `read_threads`
            # threads, up to `read_buffer_size` pieces ahead, and queues up to
            # `worker_buffer_size` pieces for the main process (its ring, a memory file, has
            # 2 x worker_buffer_size + 2 slots): pieces decoded ahead stay within workers x
            # (read_buffer_size + 2 x worker_buffer_size + 2), held in bytes with the two
            # reused batch buffers by `stream.PipelineOptions.host_bytes`.
            num_workers=Logistics(-1), prefetch_batches=Logistics(2), read_threads=Logistics(2),
            read_buffer_size=Logistics(4), worker_buffer_size=Logistics(4),
            # A training run's evaluation pool: at most this many decoding processes (and
            # never more than training's), idle between evaluations, so a small pool rather
            # than a second full one; evaluate.py, which has no training pool, uses num_workers.
            eval_workers=Logistics(4),
            # Streamed datasets: "grain" (host workers) or "dali" (GPU decoding; the same
            # images and views, the pixels to the resampler's rounding, so a run may switch).
            loader=Logistics("grain"),
        )
    )
    config.batch_size = 128
    config.eval_batch_size = Logistics(512)
    config.num_train_steps = PAPER_CIFAR_STEPS
    config.learning_rate = 0.1
    config.lr_schedule = "piecewise"
    config.lr_boundaries = (32_000 / PAPER_CIFAR_STEPS, 48_000 / PAPER_CIFAR_STEPS)
    config.lr_decay_factor = 0.1
    config.lr_warmup = "none"
    config.lr_warmup_fraction = 0.0
    config.lr_warmup_value = 0.0
    config.lr_warmup_until_error = 0.8
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    # The paper trained with Caffe, whose weight decay reaches every learned parameter
    # (conv and FC kernels, FC biases, BN scales and offsets): "kernels" leaves out the last three.
    config.weight_decay_on = "all"
    config.label_smoothing = 0.0
    # Examples per BatchNorm statistics group in training (consecutive examples of the
    # batch, so a group lies on one device where it divides the per-device batch); 0: the
    # whole global batch. The paper's two-GPU CIFAR runs normalised over 64 examples each.
    config.bn_group_size = 0
    config.steps_per_dispatch = 1
    config.eval_every_steps = Logistics(2000)
    config.checkpoint_every_steps = Logistics(2000)
    config.log_every_steps = Logistics(100)
    config.keep_checkpoints = Logistics(3)
    config.seed = 0
    config.tensorboard = Logistics(True)
    # Where compiled steps are kept across processes (resnet_jax/compile_cache.py): "auto"
    # is a per-user cache, "" turns it off, anything else is the directory.
    config.compilation_cache_dir = Logistics("auto")
    return config


def cifar_recipe(model: str, dataset: str = "cifar10") -> ml_collections.ConfigDict:
    """The paper's CIFAR-10 recipe (Sec. 4.2) for `model`, on `dataset`.

    Batch 128, SGD momentum 0.9, weight decay 1e-4 on every parameter, learning rate 0.1 divided by 10 at
    32k and 48k iterations, 64k iterations, pad-4 random crop and flip, per-pixel mean
    subtraction. ResNet-110 and ResNet-1202 warm up at 0.01 until the training error is
    below 80% ("about 400 iterations"), as measured at each log (`log_every_steps`); plain
    nets do not (the paper warms up ResNet-110 alone, and plain-110 fails either way).
    """
    config = base_config(model, dataset)
    if dataset == "fashion_mnist" and os.path.isdir(FASHION_MNIST_DEBIAN_DIR):
        config.dataset.data_dir = FASHION_MNIST_DEBIAN_DIR  # Debian's dataset-fashion-mnist: no download
    spec = model_spec(model)
    if spec["residual"] and spec["depth"] >= 110:
        config.lr_warmup = "until_error"
        config.lr_warmup_value = 0.01
        config.lr_warmup_until_error = 0.8
    return config


def imagenet_recipe(model: str, dataset: str = "imagenet2012") -> ml_collections.ConfigDict:
    """The paper's ImageNet recipe (Sec. 3.4) for `model`, on `dataset`.

    Batch 256, SGD momentum 0.9, weight decay 1e-4 on every parameter, 60e4 iterations, learning rate 0.1
    divided by 10 "when the error plateaus": the paper gives no iterations, its Figure 4
    curves drop at about 15e4 and 30e4, so the boundaries are 0.25 and 0.5 of the run
    (epochs 30 and 60 of 120, as most reproductions do). Scale augmentation (shorter side
    in [256, 480], random 224 crop, flip), AlexNet PCA lighting with std 0.1, per-pixel
    mean subtraction; in-training evaluation on center 224 crops of the 256-resized images.
    """
    config = base_config(model, dataset)
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.augment = "scale_crop_flip"
    config.dataset.lighting_std = 0.1
    config.batch_size = 256
    config.eval_batch_size = 256
    config.num_train_steps = PAPER_IMAGENET_STEPS
    config.lr_boundaries = (150_000 / PAPER_IMAGENET_STEPS, 300_000 / PAPER_IMAGENET_STEPS)
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 5_000
    return config


def imagenet_pod_recipe(model: str, batch_size: int, epochs: int = 90) -> ml_collections.ConfigDict:
    """The modern large-batch ImageNet recipe (Goyal et al. 2017, and its successors).

    Learning rate 0.1 x batch/256 after a 5-epoch linear warm-up from 0, cosine decay to 0,
    label smoothing 0.1, bfloat16 computation, the last BN of each residual branch
    initialised to zero, random-resized-crop (area 8-100%, aspect 3/4-4/3) and flip,
    per-channel mean/std normalisation, no lighting, weight decay on conv and FC kernels
    only (Goyal et al. leave BN's scales and offsets undecayed; the FC bias is left too); `epochs` over the
    1,281,167 images. BN statistics over groups of 32 examples (Goyal et al.'s 32 images per
    GPU), not over the global batch: a group on one device needs no all-reduce, where the
    global batch's statistics cost two dependent all-reduces per BN layer in the forward
    pass across every device (a group spans devices where a device holds fewer than 32).
    """
    config = imagenet_recipe(model)
    config.model.dtype = "bfloat16"
    config.model.zero_init_residual = True
    config.dataset.augment = "random_resized_crop"
    config.dataset.lighting_std = 0.0
    config.dataset.normalization = "per_channel_mean_std"
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES / batch_size
    config.batch_size = batch_size
    config.eval_batch_size = batch_size
    config.num_train_steps = round(epochs * steps_per_epoch)
    config.learning_rate = 0.1 * batch_size / 256
    config.lr_schedule = "cosine"
    config.lr_boundaries = ()
    config.lr_warmup = "linear"
    config.lr_warmup_fraction = 5 / epochs
    config.label_smoothing = 0.1
    config.weight_decay_on = "kernels"
    config.bn_group_size = POD_BN_GROUP_SIZE
    config.eval_every_steps = round(steps_per_epoch) * 5
    config.checkpoint_every_steps = round(steps_per_epoch)
    return config


# The nets of the paper's ImageNet tables, each with the shortcut option it was trained
# with ("" for a plain net). Table 2 (and Figure 4) compares plain and residual 18- and
# 34-layer nets, the residual ones with option A (identity, zero-padded where the width
# grows) on every shortcut; Table 3 compares A, B and C on ResNet-34 and trains the deeper
# nets with B; Table 4's single models are ResNet-34 B and C and the deeper nets with B.
PAPER_IMAGENET_NETS = {
    "Table 2": (("plain18", ""), ("plain34", ""), ("resnet18", "A"), ("resnet34", "A")),
    "Table 3": (("plain34", ""), ("resnet34", "A"), ("resnet34", "B"), ("resnet34", "C"),
                ("resnet50", "B"), ("resnet101", "B"), ("resnet152", "B")),
    "Table 4": (("resnet34", "B"), ("resnet34", "C"), ("resnet50", "B"), ("resnet101", "B"),
                ("resnet152", "B")),
}
CIFAR_USAGE = "configs/cifar.py:MODEL[,DATASET]"
IMAGENET_USAGE = "configs/imagenet.py:MODEL[,SHORTCUT]"
IMAGENET_POD_USAGE = "configs/imagenet_pod.py:MODEL[,BATCH_SIZE]"


def _recipe_fields(arg: str | None, usage: str, most: int) -> list[str]:
    """The comma-separated fields of a recipe file's argument: `--config=FILE:ARG` passes
    ARG to the file's `get_config(ARG)`, as ml_collections' config flags do."""
    fields = [field.strip() for field in (arg or "").split(",")]
    if not all(fields) or len(fields) > most:
        file, _, form = usage.partition(":")
        raise ConfigError(f"{file} takes {form} after ':' (got {arg!r}): --config={usage}")
    return fields


def _require_family(model: str, family: str, usage: str) -> None:
    try:
        spec = model_spec(model)
    except ValueError as error:
        raise ConfigError(f"{usage}: {error}") from None
    if spec["family"] != family:
        other = CIFAR_USAGE if spec["family"] == "cifar" else IMAGENET_USAGE
        raise ConfigError(f"{usage} takes a net of the {family} family, and {model} is of the "
                          f"{spec['family']} family: use --config={other.partition(':')[0]}:{model}")


def cifar_config(arg: str | None) -> ml_collections.ConfigDict:
    """`configs/cifar.py:MODEL[,DATASET]`: the CIFAR recipe for a CIFAR-family net (resnetD or
    plainD, D = 6n+2) on one of the small datasets (default cifar10)."""
    model, dataset = (_recipe_fields(arg, CIFAR_USAGE, 2) + ["cifar10"])[:2]
    _require_family(model, "cifar", CIFAR_USAGE)
    _require(dataset in DATASETS, "dataset.name", dataset, f"in {CIFAR_USAGE}: {', '.join(DATASETS)}")
    return cifar_recipe(model, dataset)


def paper_shortcuts(model: str) -> dict[str, list[str]]:
    """{shortcut option: the tables of `PAPER_IMAGENET_NETS` that train `model` with it}."""
    used: dict[str, list[str]] = {}
    for table, nets in PAPER_IMAGENET_NETS.items():
        for name, shortcut in nets:
            if name == model:
                used.setdefault(shortcut, []).append(table)
    return used


def imagenet_config(arg: str | None) -> ml_collections.ConfigDict:
    """`configs/imagenet.py:MODEL[,SHORTCUT]`: the paper's ImageNet recipe for an ImageNet
    net with the shortcut option the paper trained it with (`PAPER_IMAGENET_NETS`), or the
    one named; ResNet-34, trained with each of A, B and C, needs it named."""
    model, *named = _recipe_fields(arg, IMAGENET_USAGE, 2)
    _require_family(model, "imagenet", IMAGENET_USAGE)
    used = paper_shortcuts(model)
    if named:
        shortcut = named[0].upper()
        _require(shortcut in SHORTCUTS and model_spec(model)["residual"], "model.shortcut", named[0],
                 f"in {IMAGENET_USAGE}: A, B or C after a residual net (none after a plain one)")
    elif len(used) == 1:
        shortcut = next(iter(used))
    else:
        tables = "; ".join(f"{option} in {', '.join(names)}" for option, names in sorted(used.items()))
        raise ConfigError(f"the paper trains {model} with several shortcut options ({tables}): "
                          f"name one, e.g. --config=configs/imagenet.py:{model},A")
    config = imagenet_recipe(model)
    config.model.shortcut = shortcut
    return config


def imagenet_pod_config(arg: str | None) -> ml_collections.ConfigDict:
    """`configs/imagenet_pod.py:MODEL[,BATCH_SIZE]`: the large-batch recipe (default batch 4096)."""
    model, batch = (_recipe_fields(arg, IMAGENET_POD_USAGE, 2) + ["4096"])[:2]
    _require_family(model, "imagenet", IMAGENET_POD_USAGE)
    _require(batch.isdigit() and int(batch) > 0, "batch_size", batch,
             f"in {IMAGENET_POD_USAGE}: a positive integer")
    return imagenet_pod_recipe(model, int(batch))


def _is_net_of(model: str, family: str) -> bool:
    try:
        return model_spec(model)["family"] == family
    except ValueError:
        return False


def _recipe_form(path: Path) -> str | None:
    """The recipe file's `--config` for a file named after a net and a dataset
    (`cifar10_resnet110.py`, `imagenet_resnet34_a.py`, ...) that names a real net, or None."""
    cifar = re.fullmatch(r"(cifar10|cifar100|mnist|fashion_mnist)_((?:resnet|plain)\d+)\.py", path.name)
    if cifar:
        dataset, model = cifar.groups()
        form = f"--config={path.parent / 'cifar.py'}:{model},{dataset}"
        return form if _is_net_of(model, "cifar") else None
    pod = re.fullmatch(r"imagenet_((?:resnet|plain)\d+)_pod\.py", path.name)
    if pod:
        form = f"--config={path.parent / 'imagenet_pod.py'}:{pod.group(1)}"
        return form if _is_net_of(pod.group(1), "imagenet") else None
    imagenet = re.fullmatch(r"imagenet_((?:resnet|plain)\d+)(?:_([abc]))?\.py", path.name)
    if not imagenet or not _is_net_of(imagenet.group(1), "imagenet"):
        return None
    model, option = imagenet.groups()
    form = f"--config={path.parent / 'imagenet.py'}:{model}"
    if model.startswith("plain"):
        return form
    if option is None:  # the ImageNet family's default shortcut, B
        table2 = model in ("resnet18", "resnet34")
        return f"{form},B" + (" (the paper's Table 2 trains it with option A: ,A)" if table2 else "")
    return f"{form},{option.upper()}"


def _missing_config_hint(path: Path) -> str:
    """For a config file that does not exist: the recipe file's form of its name, else the
    existing config file nearest to it, else what there is."""
    form = _recipe_form(path)
    if form:
        return f"that net on that dataset is {form}"
    existing = sorted(p.name for p in path.parent.glob("*.py")) if path.parent.is_dir() else []
    nearest = difflib.get_close_matches(path.name, existing, n=1, cutoff=0.6)
    if nearest:
        return f"did you mean {path.parent / nearest[0]}?"
    return "pass one of configs/*.py, e.g. configs/cifar.py:resnet110,cifar10"


def load(spec: str | os.PathLike[str]) -> ml_collections.ConfigDict:
    """The config that a config file's `get_config()` returns; `FILE:ARG` returns
    `get_config(ARG)` (ml_collections' convention: `configs/cifar.py:resnet110,cifar10`)."""
    text, has_arg, arg = str(spec).partition(":")
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"config file {text!r} does not exist; {_missing_config_hint(path)}")
    module_spec = importlib.util.spec_from_file_location(f"resnet_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {text!r} defines no get_config()")
        if not has_arg:
            return module.get_config()
        if not inspect.signature(module.get_config).parameters:
            raise ConfigError(f"config file {text!r} takes no argument after ':' (got {arg!r})")
        return module.get_config(arg)
    except ConfigError:
        raise
    except Exception as error:  # the user's file: report where, not a traceback into it
        raise ConfigError(f"config file {text!r} failed: {type(error).__name__}: {error}") from None


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{"model.name": "resnet20", ...}: every leaf of the config with its dotted key."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# The keys a resumed run may change, read from the schema's marks (never listed by hand).
LOGISTICS_KEYS = frozenset(
    key for key, value in flat_keys(_marked_schema()).items() if isinstance(value, Logistics)
)


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
        raise fail(_a(type(current))) from None
    if isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(current, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, tuple | list):
        return tuple(value)
    raise fail(_a(type(current)))


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[tuple[str, str]]) -> None:
    """Set each (dotted key, text) pair; unknown keys are refused with the nearest name."""
    known = flat_keys(config)
    for key, text in overrides:
        if key not in known:
            raise _unknown_key(key, known)
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = _parse(key, text, known[key])


def _require(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key} = {value!r} is not accepted; expected {accepted}")


def _a(kind: type) -> str:
    """'an int', 'a float': a type's name with its article, for messages."""
    name = kind.__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


# How many of the nearest keys an unknown key's message names (a config has about 60).
NEAREST_KEYS = 4


def _unknown_key(key: str, keys: Iterable[str]) -> ConfigError:
    """An unknown key refused with the few known keys nearest to it (not all of them)."""
    nearest = difflib.get_close_matches(key, list(keys), n=NEAREST_KEYS, cutoff=0.5)
    hint = f"did you mean {nearest[0]!r}?" if nearest else "no key is near it."
    if nearest[1:]:
        hint += f" Other near keys: {', '.join(map(repr, nearest[1:]))}."
    return ConfigError(f"unknown config key {key!r}; {hint} Every key and what it means: docs/training.md")


def _check_schema(config: ml_collections.ConfigDict) -> None:
    """Every key of the recipe present, no other, each with the recipe's type (ints pass
    for floats): a config file's typo or a quoted number is caught before anything runs."""
    schema, given = flat_keys(base_config()), flat_keys(config)
    for key in sorted(set(given) - set(schema)):
        raise _unknown_key(key, schema)
    for key in sorted(set(schema) - set(given)):
        raise ConfigError(f"config key {key!r} is missing; every config has it (default: {schema[key]!r})")
    for key, value in given.items():
        expected = type(schema[key])
        if expected is float and type(value) is int:
            continue
        if type(value) is not expected:
            raise ConfigError(
                f"config.{key} = {value!r} is {_a(type(value))}; expected {_a(expected)}"
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
    _require(config.model.conv in CONV_PATHS, "model.conv", config.model.conv,
             f"{', '.join(CONV_PATHS)} (the convolution path on the CPU backend; ignored on GPU and TPU)")
    _check_dataset(config.dataset)
    _require(config.dataset.name in DATASETS or config.steps_per_dispatch == 1, "steps_per_dispatch",
             config.steps_per_dispatch, "1 for a streamed dataset (each step gets its batch from the host)")
    _require(config.batch_size > 0 and config.batch_size % num_devices == 0, "batch_size", config.batch_size,
             f"a positive multiple of the device count ({num_devices})")
    check_evaluation(config, num_devices)
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
    _require(config.lr_warmup != "until_error" or 0 < config.lr_warmup_value <= 10, "lr_warmup_value",
             config.lr_warmup_value, "a number in (0, 10] for lr_warmup='until_error'")
    _require(0 < config.lr_warmup_until_error <= 1, "lr_warmup_until_error", config.lr_warmup_until_error,
             "a training error in (0, 1]")
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
             f"a divisor of the per-device batch ({config.batch_size} / {num_devices} devices = "
             f"{per_device}: each group's statistics stay on its device) or a multiple of it (each "
             "group then spans whole devices, which all-reduce its statistics among themselves)")


def check_evaluation(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Refuse an eval batch, worker count or loader that cannot run on `num_devices`: the
    keys evaluate.py may override at evaluation time (a run evaluated on other devices)."""
    _require(config.eval_batch_size > 0 and config.eval_batch_size % num_devices == 0, "eval_batch_size",
             config.eval_batch_size, f"a positive multiple of the device count ({num_devices})")
    _require(config.dataset.num_workers >= -1, "dataset.num_workers", config.dataset.num_workers,
             "-1 (the CPUs this process may use, shared among the host's training processes), "
             "0 (in the main process) or a number of processes")
    _require(isinstance(config.dataset.eval_workers, int) and config.dataset.eval_workers >= 0,
             "dataset.eval_workers", config.dataset.eval_workers,
             "0 (evaluation decodes in the main process) or a number of processes for a training "
             "run's evaluation (at most dataset.num_workers of them)")
    loader, name = config.dataset.loader, config.dataset.name
    _require(loader in LOADERS, "dataset.loader", loader,
             f"'grain' (the default: decoding on the host) or 'dali' (decoding on NVIDIA GPUs, "
             f"{DALI_INSTALL})")
    _require(name in STREAMED_DATASETS or loader == "grain", "dataset.loader", loader,
             f"'grain' for {name}, which lives on the devices; 'dali' reads the streamed datasets "
             f"({', '.join(STREAMED_DATASETS)})")


def _check_dataset(dataset: ml_collections.ConfigDict) -> None:
    name = dataset.name
    _require(name in DATASETS + STREAMED_DATASETS, "dataset.name", name,
             ", ".join(DATASETS + STREAMED_DATASETS))
    streamed = name in STREAMED_DATASETS
    splits = STREAM_SPLITS if streamed else SPLITS
    for key in ("train_split", "eval_split"):
        _require(dataset[key] in splits, f"dataset.{key}", dataset[key], f"for {name}: {', '.join(splits)}")
    _require(dataset.eval_split != "holdout_validation" or dataset.train_split == "holdout_train",
             "dataset.train_split", dataset.train_split,
             "'holdout_train' when evaluating on 'holdout_validation' (else it trains on it)")
    augmentations = STREAMED_AUGMENTATIONS if streamed else IN_MEMORY_AUGMENTATIONS
    _require(dataset.augment in augmentations, "dataset.augment", dataset.augment,
             f"for {name}: {', '.join(augmentations)}")
    _require(dataset.crop_padding >= 0, "dataset.crop_padding", dataset.crop_padding, "an integer >= 0")
    _require(dataset.normalization in NORMALIZATIONS, "dataset.normalization", dataset.normalization,
             ", ".join(NORMALIZATIONS))
    known = STREAMED_NUM_CLASSES.get(name) if streamed else num_classes(name)
    if known is None:  # image_folder: the folders decide; only a positive count can be given
        _require(dataset.num_classes >= 0, "dataset.num_classes", dataset.num_classes,
                 "0 (the number of class folders) or that number")
    else:
        _require(dataset.num_classes in (0, known), "dataset.num_classes", dataset.num_classes,
                 f"0 or {known} for {name}")
    _require(not (name == "image_folder" and not dataset.data_dir), "dataset.data_dir", dataset.data_dir,
             "for image_folder, a directory holding train/<class>/* and val/<class>/* images")
    size = dataset.image_size
    _require(size >= 1, "dataset.image_size", size, "an integer >= 1")
    low, high = _pair(dataset, "scale_range", int)
    _require(size <= low <= high, "dataset.scale_range", dataset.scale_range,
             f"(low, high) shorter sides with image_size ({size}) <= low <= high")
    low, high = _pair(dataset, "area_range", float)
    _require(0 < low <= high <= 1, "dataset.area_range", dataset.area_range,
             "(low, high) fractions of the image area with 0 < low <= high <= 1")
    low, high = _pair(dataset, "aspect_ratio_range", float)
    _require(0 < low <= high, "dataset.aspect_ratio_range", dataset.aspect_ratio_range,
             "(low, high) width/height ratios with 0 < low <= high")
    _require(dataset.lighting_std >= 0, "dataset.lighting_std", dataset.lighting_std,
             "a number >= 0 (0: no lighting augmentation)")
    _require(dataset.eval_resize >= size, "dataset.eval_resize", dataset.eval_resize,
             f"a shorter side >= image_size ({size})")
    sizes = dataset.multi_scale_sizes
    _require(len(sizes) > 0 and all(isinstance(s, int) and s >= 1 for s in sizes),
             "dataset.multi_scale_sizes", sizes, "a non-empty tuple of shorter sides (integers >= 1)")
    _require(dataset.read_threads >= 1, "dataset.read_threads", dataset.read_threads, "an integer >= 1")
    _require(dataset.read_buffer_size >= dataset.read_threads, "dataset.read_buffer_size",
             dataset.read_buffer_size, f"an integer >= dataset.read_threads ({dataset.read_threads}): "
             "a smaller buffer leaves threads idle")
    _require(dataset.worker_buffer_size >= 1, "dataset.worker_buffer_size", dataset.worker_buffer_size,
             "an integer >= 1")
    _require(dataset.prefetch_batches >= 1, "dataset.prefetch_batches", dataset.prefetch_batches,
             "an integer >= 1")


def _pair(dataset: ml_collections.ConfigDict, key: str, kind: type) -> tuple:
    value = dataset[key]
    numbers = (int,) if kind is int else (int, float)
    ok = len(value) == 2 and all(isinstance(v, numbers) and not isinstance(v, bool) for v in value)
    _require(ok, f"dataset.{key}", value, f"a pair of {kind.__name__}s (low, high)")
    return value


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def fingerprint(config: ml_collections.ConfigDict) -> str:
    """A hash of everything that decides what a run computes (not its logistics)."""
    flat = {k: v for k, v in flat_keys(config).items() if k not in LOGISTICS_KEYS}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=list).encode()).hexdigest()[:16]


def differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> list[str]:
    """'key: a_value != b_value' for each computing key where two configs differ."""
    fa, fb = flat_keys(a), flat_keys(b)
    keys = sorted((set(fa) | set(fb)) - LOGISTICS_KEYS)
    return [f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in keys if fa.get(k) != fb.get(k)]


def from_dict(values: dict[str, Any]) -> ml_collections.ConfigDict:
    """A config read back from `config.json` (lists become the tuples they were). Keys added
    to the schema after it was written get their defaults, which are what the run used."""
    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            return ml_collections.ConfigDict({k: restore(v) for k, v in value.items()})
        return tuple(value) if isinstance(value, list) else value

    config = restore(values)
    given = flat_keys(config)
    for key, default in flat_keys(base_config()).items():
        if key not in given:
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[leaf] = default
    return config
