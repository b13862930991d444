"""The project's default run: the paper's CIFAR-10 ResNet-20 (Table 6), the same config as
configs/cifar.py:resnet20,cifar10."""

from resnet_jax.config import cifar_config


def get_config():
    return cifar_config("resnet20,cifar10")
