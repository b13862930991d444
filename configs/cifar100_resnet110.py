"""resnet110 on CIFAR-100 (the CIFAR-10 recipe): the paper's CIFAR recipe (Sec. 4.2)."""

from resnet_jax.config import cifar_recipe


def get_config():
    return cifar_recipe("resnet110", "cifar100")
