"""plain32 on CIFAR-10: the paper's CIFAR recipe (Sec. 4.2)."""

from resnet_jax.config import cifar_recipe


def get_config():
    return cifar_recipe("plain32", "cifar10")
