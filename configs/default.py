"""The paper's CIFAR-10 ResNet-20 (Sec. 4.2): the project's default run."""

from resnet_jax.config import cifar_recipe


def get_config():
    return cifar_recipe("resnet20", "cifar10")
