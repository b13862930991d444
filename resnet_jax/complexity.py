"""Model size and cost, measured from the model itself rather than from a table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (BN running statistics are not parameters)."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one example's forward pass through every conv and dense layer.

    The paper's FLOPs column counts exactly these; BN, ReLU, pooling and additions are
    left out as there. Works from shapes alone (`jax.eval_shape`): nothing is computed,
    so ResNet-152 at 640x640 costs no more than ResNet-8.
    """
    batch = int(input_shape[0])
    total = 0

    def add_layer_macs(next_fun, args, kwargs, context):
        nonlocal total
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
            in_features = args[0].shape[-1]
            if isinstance(module, nn.Conv):
                per_output = int(np.prod(module.kernel_size)) * in_features // module.feature_group_count
            else:
                per_output = in_features
            total += int(np.prod(out.shape)) * per_output
        return out

    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    with nn.intercept_methods(add_layer_macs):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return total // batch

