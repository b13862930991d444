"""ResNet-34 with shortcut option A (Sec. 3.3, Table 3) on ImageNet: the paper's recipe."""

from resnet_jax.config import imagenet_recipe


def get_config():
    config = imagenet_recipe("resnet34")
    config.model.shortcut = "A"
    return config
