"""A run's model and training state, as its config describes them.

What training (`train.py`) builds and what a checkpoint (`checkpoint.py`) is restored
into: the network sized for the dataset's classes, the `TrainState` it starts from, and
that state's shapes alone. Both import this module; it imports neither.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from resnet_jax import backend, schedules
from resnet_jax.config import ConfigError
from resnet_jax.data.image_records import STREAMED_DATASETS, STREAMED_NUM_CLASSES
from resnet_jax.data.sources import IMAGE_SHAPES, num_classes
from resnet_jax.models import ResNet, create_model
from resnet_jax.parallel import data_parallel


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # The step where an "until_error" warm-up ended (schedules.WARMUP_NOT_ENDED: not yet).
    lr_warmup_end: jax.Array


def dataset_classes(config: ml_collections.ConfigDict) -> int:
    """The number of classes of the config's dataset (image folders': set by training)."""
    name = config.dataset.name
    if config.dataset.num_classes:
        return config.dataset.num_classes
    if name in STREAMED_NUM_CLASSES:
        return STREAMED_NUM_CLASSES[name]
    if name in STREAMED_DATASETS:
        raise ConfigError(
            f"config.dataset.num_classes = 0 for {name}: the number of class folders, which "
            "train_and_evaluate reads from dataset.data_dir and saves in config.json"
        )
    return num_classes(name)


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(height, width, channels) of one training image as the network sees it."""
    if config.dataset.name in STREAMED_DATASETS:
        return (config.dataset.image_size, config.dataset.image_size, 3)
    return IMAGE_SHAPES[config.dataset.name]


def build_model(config: ml_collections.ConfigDict) -> ResNet:
    """The network a config describes, sized for its dataset's classes, its convolutions
    on the config's CPU path (`backend.conv_module`)."""
    overrides = dict(
        conv=backend.conv_module(config.model.conv),
        num_classes=dataset_classes(config),
        dtype=jnp.dtype(config.model.dtype),
        zero_init_residual=config.model.zero_init_residual,
        stride_in_1x1=config.model.stride_in_1x1,
        bn_group_size=config.bn_group_size,
    )
    if config.model.shortcut:
        overrides["shortcut"] = config.model.shortcut
    return create_model(config.model.name, **overrides)


def init_state(config: ml_collections.ConfigDict, model: ResNet, key: jax.Array) -> TrainState:
    """A fresh state: the model initialised from `key`, step 0, the optimizer's state, the
    warm-up not ended if it ends on the training error."""
    image = jnp.zeros((1, *input_shape(config)), jnp.float32)
    variables = model.init(key, image, train=False)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=schedules.optimizer(config).init(variables["params"]),
        lr_warmup_end=jnp.int32(schedules.initial_warmup_end(config)),
    )


def abstract_train_state(
    config: ml_collections.ConfigDict, model: ResNet, sharding: jax.sharding.Sharding | None = None
) -> TrainState:
    """The state's shapes and dtypes (and placement), to restore a checkpoint into."""
    sharding = sharding or data_parallel().replicated
    shapes = jax.eval_shape(lambda key: init_state(config, model, key), jax.random.key(0))
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
