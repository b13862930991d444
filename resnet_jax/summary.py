"""`python -m resnet_jax.summary [NAME ...]`: the model table of docs/models.md, from the code.

Prints, as markdown, each named model's family, shortcut option, parameter count and
multiply-adds at its family's input size (224x224 RGB and 1000 classes for ImageNet
nets, 32x32 RGB and 10 classes for CIFAR nets).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from resnet_jax.complexity import count_macs, count_params
from resnet_jax.models import create_model, list_models, model_spec


def _format_macs(macs: int) -> str:
    return f"{macs / 1e9:.2f}G" if macs >= 1e9 else f"{macs / 1e6:.1f}M"


def model_table(names: Sequence[str]) -> str:
    rows = ["| model | family (input) | shortcut | params | multiply-adds |", "|---|---|---|---|---|"]
    for name in names:
        spec = model_spec(name)
        size = 224 if spec["family"] == "imagenet" else 32
        model = create_model(name)
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        shortcut = spec["shortcut"] if spec["residual"] else "none (plain)"
        rows.append(
            f"| {name} | {spec['family']} ({size}x{size}) | {shortcut} | "
            f"{count_params(params):,} | {_format_macs(count_macs(model, (1, size, size, 3)))} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str]) -> None:
    print(model_table(argv or list_models()))


if __name__ == "__main__":
    main(sys.argv[1:])
