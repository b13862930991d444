"""ResNet-50 on ImageNet with the modern large-batch recipe, for pods (config.imagenet_pod_recipe):
batch 4096, learning rate 0.1 x 4096/256 = 1.6 after a 5-epoch linear warm-up, cosine
decay over 90 epochs, label smoothing 0.1, bfloat16, zero-init residual, random-resized-crop.
Change the batch with --config.batch_size and scale learning_rate with it."""

from resnet_jax.config import imagenet_pod_recipe


def get_config():
    return imagenet_pod_recipe("resnet50", batch_size=4096)
