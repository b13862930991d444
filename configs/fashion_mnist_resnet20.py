"""ResNet-20 on Fashion-MNIST with the paper's CIFAR recipe, reading Debian's
dataset-fashion-mnist files when installed (no download): the offline quick start, the
same config as configs/cifar.py:resnet20,fashion_mnist."""

from resnet_jax.config import cifar_config


def get_config():
    return cifar_config("resnet20,fashion_mnist")
