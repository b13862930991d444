"""What `make train` runs: ResNet-20 on Fashion-MNIST with the paper's CIFAR recipe
compressed from 64,000 to 2,000 steps (about 4 epochs; the learning rate divided by 10 at
the same fractions of the run, steps 1,000 and 1,500), evaluated on the 10,000 test images
every 500 steps. It reads Debian's dataset-fashion-mnist files (no download). Its test
error and time on a 2-core CPU: benchmarks/RESULTS.md."""

from resnet_jax.config import cifar_config


def get_config():
    config = cifar_config("resnet20,fashion_mnist")
    config.num_train_steps = 2_000
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    return config
