"""The paper's CIFAR-10 ResNet-20 (Table 6) with its full schedule (64,000 steps; hours on a
CPU), the same config as configs/cifar.py:resnet20,cifar10. tensorflow-datasets downloads
CIFAR-10 the first time: `make train CONFIG=configs/cifar10_resnet20.py`."""

from resnet_jax.config import cifar_config


def get_config():
    return cifar_config("resnet20,cifar10")
