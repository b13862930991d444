"""plain56 on Fashion-MNIST, 28x28 grayscale (the CIFAR-10 recipe): the paper's CIFAR recipe (Sec. 4.2)."""

from resnet_jax.config import cifar_recipe


def get_config():
    return cifar_recipe("plain56", "fashion_mnist")
