"""The PyTorch reference: the same CIFAR ResNet training step, timed like train_throughput.py.

    python benchmarks/torch_resnet20.py [--depth=20] [--batch_size=128] [--steps=10] [--threads=2]

The paper's CIFAR ResNet (3x3 stem with 16 filters, three stages of 2n basic blocks on
16/32/64 channels, option A shortcuts, BN, He init) in NCHW, trained with SGD (momentum
0.9, weight decay 1e-4, learning rate 0.1) and cross-entropy on a fixed random batch
already in memory: the JAX step's batch gathering, normalisation and augmentation are
not done here (they are a small part of its step). One untimed warm-up step, then
`step_ms` is the median over `steps` single steps; prints one JSON line like
train_throughput.py's (`images_per_sec`, `step_ms`, `warmup_s`, `macs_per_image`,
`achieved_flops_per_sec` with the same 6 x MACs convention, `device`, `torch_version`,
`threads` and the arguments).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

# A training step counts as three forward passes at 2 FLOPs per multiply-add (as train_throughput.py).
FLOPS_PER_MAC_TRAINING = 3 * 2
NUM_CLASSES = 10


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra = stride, c_out - c_in

    def shortcut_a(self, x: torch.Tensor) -> torch.Tensor:
        """Identity, subsampled and zero-padded in channels (option A)."""
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut_a(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth {depth} is not 6n+2 with n >= 1")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, c_in = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(BasicBlock(c_in, width, 2 if stage > 0 and j == 0 else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, NUM_CLASSES)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def macs_per_image(model: nn.Module, image_size: int) -> int:
    """Multiply-adds of the conv and linear layers for one image (as resnet_jax.count_macs)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        total += output.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="6n+2")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = CifarResNet(args.depth)
    macs = macs_per_image(model, args.image_size)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,))

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    start = time.perf_counter()
    step()
    warmup_s = time.perf_counter() - start
    step_times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        step_times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise RuntimeError(f"the training loss is {loss.item()}: the timed step is broken")

    step_s = statistics.median(step_times)
    images_per_sec = args.batch_size / step_s
    print(json.dumps(dict(
        images_per_sec=images_per_sec,
        step_ms=step_s * 1e3,
        warmup_s=warmup_s,
        macs_per_image=macs,
        achieved_flops_per_sec=FLOPS_PER_MAC_TRAINING * macs * images_per_sec,
        device="cpu",
        torch_version=torch.__version__,
        **vars(args),
    )), flush=True)


if __name__ == "__main__":
    main()
