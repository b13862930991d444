"""The modern large-batch ImageNet recipe for pods (`config.imagenet_pod_recipe`).

    --config=configs/imagenet_pod.py:MODEL[,BATCH_SIZE]      e.g. configs/imagenet_pod.py:resnet50,4096

Batch BATCH_SIZE (default 4096), learning rate 0.1 x BATCH_SIZE/256 after a 5-epoch
linear warm-up, cosine decay over 90 epochs, label smoothing 0.1, bfloat16, zero-init
residual, random-resized-crop, weight decay on kernels only; not the paper's recipe
(Goyal et al. 2017 and its successors).
"""

from resnet_jax.config import imagenet_pod_config


def get_config(arg=None):
    return imagenet_pod_config(arg)
