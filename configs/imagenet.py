"""The paper's ImageNet recipe (Sec. 3.4; `config.imagenet_recipe`) for one net.

    --config=configs/imagenet.py:MODEL[,SHORTCUT]      e.g. configs/imagenet.py:resnet50

MODEL: resnet18, 34, 50, 101, 152 or plain18, plain34. Without SHORTCUT a net gets the
option the paper trained it with (`config.PAPER_IMAGENET_NETS`):
- Table 2 and Figure 4: plain18, plain34, resnet18 (A), resnet34,A: option A (identity,
  zero-padded where the width grows) on every shortcut;
- Table 3: plain34, resnet34,A / resnet34,B / resnet34,C, and resnet50, resnet101,
  resnet152 with option B (projections where the width grows);
- Table 4: resnet34,B, resnet34,C, resnet50, resnet101, resnet152.
ResNet-34 appears with each option, so it needs one named. Another dataset:
--config.dataset.name=image_folder --config.dataset.data_dir=DIR (or imagenette).
"""

from resnet_jax.config import imagenet_config


def get_config(arg=None):
    return imagenet_config(arg)
