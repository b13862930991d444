"""resnet_jax: the networks and training recipes of He et al. (2015) in JAX/Flax.

    import resnet_jax as rj
    model = rj.create_model("resnet50", num_classes=1000)
    variables = model.init(jax.random.key(0), images, train=False)
    model, variables, config = rj.checkpoint.load("runs/r20")

The models are imported here; every other submodule (`rj.checkpoint`, `rj.convert`,
`rj.train`, ...) on first access, so that `import resnet_jax` stays light.
"""

import importlib
import importlib.util

from resnet_jax.complexity import count_macs, count_params
from resnet_jax.models import ResNet, create_model, list_models, model_spec

__all__ = ["ResNet", "count_macs", "count_params", "create_model", "list_models", "model_spec"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`resnet_jax.<submodule>` without importing it first (PEP 562)."""
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
