"""The optimizer and learning-rate schedules: optax SGD with momentum, as in the paper.

Schedule boundaries are fractions of `num_train_steps`, so shortening a run (a smoke
test, a CPU budget) keeps the paper's shape: the CIFAR recipe divides by 10 at 32k and
48k of 64k iterations, i.e. at fractions 0.5 and 0.75.

ResNet-110's warm-up (Sec. 4.2) is not a step count but a condition: 0.01 "until the
training error is below 80% (about 400 iterations)", then 0.1. The training loop checks
the training error of each regular log, its mean over the `log_every_steps` steps before
(`warmup_ends`), and records the step where the warm-up ended in the train state
(`WARMUP_NOT_ENDED` until then), which the compiled step reads: the learning rate is a
function of (step, warm-up end), both saved in every checkpoint. (A run resumed from a
checkpoint between two logs, as after a preemption, checks its first log's mean over the
steps since it resumed.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("piecewise", "cosine")
WARMUPS = ("none", "until_error", "linear")
WEIGHT_DECAY_ON = ("kernels", "all")
# The train state's warm-up end while an "until_error" warm-up lasts.
WARMUP_NOT_ENDED = -1


def initial_warmup_end(config: Any) -> int:
    """The warm-up end a fresh run starts with: not ended for "until_error", else step 0
    (the other warm-ups are fixed in steps and read nothing from the state)."""
    return WARMUP_NOT_ENDED if config.lr_warmup == "until_error" else 0


def warmup_ends(config: Any, warmup_end: int, train_error: float) -> bool:
    """Whether a logged training error (the mean over the log interval) ends an
    "until_error" warm-up that has not ended yet: it fell below `lr_warmup_until_error`."""
    return (config.lr_warmup == "until_error" and warmup_end == WARMUP_NOT_ENDED
            and train_error < config.lr_warmup_until_error)


def learning_rate_schedule(config: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`lr(step, warmup_end)`: `config.lr_schedule` after an optional warm-up.

    - "piecewise": `learning_rate`, multiplied by `lr_decay_factor` at each fraction in
      `lr_boundaries` of `num_train_steps` (the paper's recipes);
    - "cosine": from `learning_rate` to 0 at `num_train_steps`.
    Warm-up (`lr_warmup`): "until_error" holds `lr_warmup_value` (ResNet-110's 0.01) until
    `warmup_end`, the step at which the training error fell below `lr_warmup_until_error`
    (`WARMUP_NOT_ENDED`: not yet); the boundaries stay steps of the whole run, as the
    paper's 32k and 48k. "linear" ramps from 0 over `lr_warmup_fraction` of the run (the
    large-batch recipe's 5 epochs), and the cosine starts where it ends.
    """
    total = config.num_train_steps
    linear_steps = round(config.lr_warmup_fraction * total) if config.lr_warmup == "linear" else 0
    if config.lr_schedule == "piecewise":
        boundaries = {round(f * total): config.lr_decay_factor for f in config.lr_boundaries}
        main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
        offset = 0  # boundaries are steps of the whole run, warm-up included
    else:
        main = optax.cosine_decay_schedule(config.learning_rate, max(total - linear_steps, 1))
        offset = linear_steps  # the cosine starts where the warm-up ends
    if config.lr_warmup == "until_error":
        def until_error(step, warmup_end):
            warming = (warmup_end == WARMUP_NOT_ENDED) | (step < warmup_end)
            return jnp.where(warming, config.lr_warmup_value, main(step))
        return until_error
    if linear_steps:
        ramp = optax.linear_schedule(0.0, config.learning_rate, linear_steps)
        return lambda step, warmup_end: jnp.where(step < linear_steps, ramp(step), main(step - offset))
    return lambda step, warmup_end: main(step)


def _decay_mask(params: Any, on: str) -> Any:
    if on == "all":  # Caffe's setting, as the paper used: biases and BN parameters too
        return jax.tree_util.tree_map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def optimizer(config: Any) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay added to the gradient (as Caffe and PyTorch
    do, so decay is scaled by the learning rate), on the parameters `weight_decay_on`
    names: "all" (the paper's recipes, as its Caffe setup did) or "kernels" (conv and
    dense kernels only, as most large-batch recipes since Goyal et al. 2017).

    The learning rate is a hyperparameter of the state (`optax.inject_hyperparams`): the
    train step sets it from `learning_rate_schedule` before each update (`with_learning_rate`).
    """
    def sgd(learning_rate):
        return optax.chain(
            optax.add_decayed_weights(
                config.weight_decay, mask=lambda params: _decay_mask(params, config.weight_decay_on)
            ),
            optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov),
        )

    return optax.inject_hyperparams(sgd)(learning_rate=config.learning_rate)


def with_learning_rate(opt_state: optax.InjectHyperparamsState, learning_rate: jax.Array):
    """`opt_state` whose next update steps at `learning_rate`."""
    hyperparams = {**opt_state.hyperparams, "learning_rate": jnp.asarray(learning_rate, jnp.float32)}
    return opt_state._replace(hyperparams=hyperparams)
