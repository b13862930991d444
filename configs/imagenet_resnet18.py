"""ResNet-18 on ImageNet: the paper's recipe (Sec. 3.4; see config.imagenet_recipe for the
learning-rate drops chosen at 15e4 and 30e4 of the 60e4 iterations, from Figure 4)."""

from resnet_jax.config import imagenet_recipe


def get_config():
    return imagenet_recipe("resnet18")
