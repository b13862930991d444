"""The optimizer and learning-rate schedules: optax SGD with momentum, as in the paper.

Schedule boundaries are fractions of `num_train_steps`, so shortening a run (a smoke
test, a CPU budget) keeps the paper's shape: the CIFAR recipe divides by 10 at 32k and
48k of 64k iterations, i.e. at fractions 0.5 and 0.75.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("piecewise", "cosine")
WARMUPS = ("none", "constant", "linear")
WEIGHT_DECAY_ON = ("kernels", "all")


def learning_rate_schedule(config: Any) -> optax.Schedule:
    """`config.lr_schedule` after an optional warm-up.

    - "piecewise": `learning_rate`, multiplied by `lr_decay_factor` at each fraction in
      `lr_boundaries` of `num_train_steps` (the paper's recipes);
    - "cosine": from `learning_rate` to 0 at `num_train_steps`.
    Warm-up (`lr_warmup`) lasts `lr_warmup_fraction` of the run: "constant" holds
    `lr_warmup_value` (ResNet-110's 0.01, Sec. 4.2), "linear" ramps from 0 (large batches).
    """
    total = config.num_train_steps
    warmup_steps = round(config.lr_warmup_fraction * total) if config.lr_warmup != "none" else 0
    if config.lr_schedule == "piecewise":
        boundaries = {round(f * total): config.lr_decay_factor for f in config.lr_boundaries}
        main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
        offset = 0  # boundaries are steps of the whole run, warm-up included
    else:
        main = optax.cosine_decay_schedule(config.learning_rate, max(total - warmup_steps, 1))
        offset = warmup_steps  # the cosine starts where the warm-up ends
    if not warmup_steps:
        return main
    if config.lr_warmup == "constant":
        warmup = optax.constant_schedule(config.lr_warmup_value)
    else:
        warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
    return lambda step: jnp.where(step < warmup_steps, warmup(step), main(step - offset))


def _decay_mask(params: Any, on: str) -> Any:
    if on == "all":  # Caffe's setting, as the paper used: biases and BN parameters too
        return jax.tree_util.tree_map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def optimizer(config: Any) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay added to the gradient (as Caffe and PyTorch
    do, so decay is scaled by the learning rate), on the parameters `weight_decay_on`
    names: "all" (the paper's recipes, as its Caffe setup did) or "kernels" (conv and
    dense kernels only, as most large-batch recipes since Goyal et al. 2017)."""
    return optax.chain(
        optax.add_decayed_weights(
            config.weight_decay, mask=lambda params: _decay_mask(params, config.weight_decay_on)
        ),
        optax.sgd(learning_rate_schedule(config), momentum=config.momentum, nesterov=config.nesterov),
    )
