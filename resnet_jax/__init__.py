"""resnet_jax: the networks and training recipes of He et al. (2015) in JAX/Flax.

    import resnet_jax as rj
    model = rj.create_model("resnet50", num_classes=1000)
    variables = model.init(jax.random.key(0), images, train=False)
"""

from resnet_jax.complexity import count_macs, count_params
from resnet_jax.models import ResNet, create_model, list_models, model_spec

__all__ = ["ResNet", "count_macs", "count_params", "create_model", "list_models", "model_spec"]
__version__ = "0.1.0"
