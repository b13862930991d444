"""The paper's CIFAR recipe (Sec. 4.2; `config.cifar_recipe`) for one net on one small dataset.

    --config=configs/cifar.py:MODEL[,DATASET]      e.g. configs/cifar.py:resnet110,cifar10

MODEL: resnetD or plainD for a CIFAR depth D = 6n+2. Every residual net has shortcut
option A (identity, zero-padded where the width grows), as all the paper's CIFAR nets.
On cifar10 (the default) these are the nets of the paper's Table 6 (ResNet-20, 32, 44,
56, 110, 1202) and Figure 6 (plain and ResNet-20, 32, 44, 56, 110). DATASET: cifar10,
cifar100, mnist, or fashion_mnist (read from Debian's dataset-fashion-mnist files when
they are installed).
"""

from resnet_jax.config import cifar_config


def get_config(arg=None):
    return cifar_config(arg)
