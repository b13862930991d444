"""The nets an experiment compares, each trained once per seed, and the paper's numbers
for them.

A net's seed-s run is named `<model>_seed<s>` (`<model>_<shortcut>_seed<s>` for a shortcut
option named rather than the family's default: A for CIFAR nets), so the `depth`,
`shortcuts` and `responses` experiments share the runs they have in common when given the
same --out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import ml_collections

from resnet_jax import checkpoint
from resnet_jax.complexity import count_params
from resnet_jax.config import PAPER_IMAGENET_NETS, cifar_recipe, imagenet_recipe
from resnet_jax.experiments.runs import Run, RunOptions, make_run, run_config
from resnet_jax.models import model_spec

KINDS = ("plain", "resnet")
KIND_LABELS = {"plain": "plain", "resnet": "ResNet"}
# Table 6: CIFAR-10 test error (%) at 64k iterations of batch 128. ResNet-110's 6.43 is
# the best of 5 runs; their mean and std were 6.61 +- 0.16. Plain nets appear only in
# Figure 6, without a number.
PAPER_CIFAR10_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
PAPER_NOTES = {110: "best of 5 runs; mean 6.61 +- 0.16"}
# Table 3 compares the options on ImageNet only (ResNet-34, 10-crop top-1 error).
PAPER_IMAGENET_SHORTCUTS = (
    "The paper compares the options on ImageNet only (Table 3, ResNet-34, 10-crop top-1 error): "
    "A 25.03%, B 24.52%, C 24.19%; it uses A for every CIFAR net."
)
# Table 2: ImageNet top-1 validation error (%), 10-crop testing, of the nets of Figure 4.
PAPER_TABLE2_TOP1_ERROR = {"plain18": 27.94, "plain34": 28.54, "resnet18": 27.88, "resnet34": 25.03}
PAPER_SCHEDULE = {"dataset": "cifar10", "num_train_steps": 64_000, "batch_size": 128}
PAPER_IMAGENET_SCHEDULE = {"dataset": "imagenet2012", "num_train_steps": 600_000, "batch_size": 256}
# Depths at which the paper trains a ResNet but no plain net (ResNet-1202, Table 6): the
# depth sweep trains the residual net alone there.
RESNET_ONLY_DEPTHS = (1202,)


@dataclasses.dataclass(frozen=True)
class Net:
    """One network of an experiment: `label` as the paper writes it ("ResNet-20")."""

    kind: str  # "plain" or "resnet"
    depth: int
    shortcut: str  # "" for the family's default (A on CIFAR, B on ImageNet)
    runs: tuple[Run, ...]  # one per seed, in seed order

    @property
    def model(self) -> str:
        return f"{self.kind}{self.depth}"

    @property
    def label(self) -> str:
        return f"{KIND_LABELS[self.kind]}-{self.depth}"

    @property
    def shortcut_option(self) -> str:
        """"A", "B", "C", or "none" for a plain net."""
        return "none" if self.kind == "plain" else self.shortcut or model_spec(self.model)["shortcut"]

    @property
    def paper_test_error(self) -> float | None:
        """The paper's number: for an ImageNet net of Table 2 (plain, or option A) its top-1
        10-crop validation error; for a CIFAR ResNet with option A its CIFAR-10 test error."""
        if model_spec(self.model)["family"] == "imagenet":
            table2 = self.shortcut_option in ("none", "A")
            return PAPER_TABLE2_TOP1_ERROR.get(self.model) if table2 else None
        if self.kind != "resnet" or self.shortcut_option != "A":
            return None
        return PAPER_CIFAR10_TEST_ERROR.get(self.depth)


def cifar_depth(text: str) -> int:
    """A depth that names a CIFAR-family net (6n+2, not one of the ImageNet depths)."""
    try:
        depth = int(text)
    except ValueError:
        depth = None
    if depth is None or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth {text!r} is not a CIFAR depth 6n+2 with n >= 1 (8, 14, 20, 26, 32, ...)")
    if model_spec(f"resnet{depth}")["family"] != "cifar":
        raise ValueError(f"depth {depth} names an ImageNet net; CIFAR depths are 6n+2 other than 50 and 152")
    return depth


def make_net(out: Path, kind: str, depth: int, seeds: int, options: RunOptions, shortcut: str = "",
             recipe: Callable[[str, str], ml_collections.ConfigDict] = cifar_recipe) -> Net:
    model = f"{kind}{depth}"
    prefix = f"{model}_{shortcut}" if shortcut else model
    runs = tuple(
        make_run(out, f"{prefix}_seed{seed}", run_config(model, seed, options, shortcut, recipe))
        for seed in range(seeds)
    )
    return Net(kind, depth, shortcut, runs)


def depth_nets(out: Path, depths: list[int], seeds: int, options: RunOptions) -> list[Net]:
    """Figure 6 and Table 6: plain and residual nets at each depth (residual only at the
    `RESNET_ONLY_DEPTHS`, as in the paper)."""
    return [
        make_net(out, kind, depth, seeds, options)
        for kind in KINDS for depth in depths
        if not (kind == "plain" and depth in RESNET_ONLY_DEPTHS)
    ]


def shortcut_nets(out: Path, depths: list[int], seeds: int, options: RunOptions) -> list[Net]:
    """Table 3's comparison at CIFAR scale: options A (the default, ""), B and C."""
    return [
        make_net(out, "resnet", depth, seeds, options, shortcut)
        for depth in depths for shortcut in ("", "B", "C")
    ]


def response_nets(out: Path, depths: list[int], seeds: int, options: RunOptions) -> list[Net]:
    """Figure 7: the same nets as `depth_nets` (so their runs are shared)."""
    return depth_nets(out, depths, seeds, options)


def table2_nets(out: Path, seeds: int, options: RunOptions) -> list[Net]:
    """Table 2 and Figure 4: plain-18/34 and ResNet-18/34 with option A on every shortcut,
    trained with the paper's ImageNet recipe."""
    nets = []
    for model, shortcut in PAPER_IMAGENET_NETS["Table 2"]:
        spec = model_spec(model)
        kind = "resnet" if spec["residual"] else "plain"
        nets.append(make_net(out, kind, spec["depth"], seeds, options, shortcut, recipe=imagenet_recipe))
    return nets


def param_count(net: Net) -> int:
    """Parameters of the net, counted in its seed-0 run's final checkpoint."""
    run = net.runs[0]
    _, variables, _ = checkpoint.load(run.workdir, run.config.num_train_steps)
    return count_params(variables["params"])


def paper_schedule_differences(config, paper_schedule: dict = PAPER_SCHEDULE) -> list[str]:
    """How a run's dataset and schedule differ from those of the paper's table
    (`PAPER_SCHEDULE`: Table 6's; `PAPER_IMAGENET_SCHEDULE`: Table 2's)."""
    ours = {"dataset": config.dataset.name, "num_train_steps": config.num_train_steps,
            "batch_size": config.batch_size}
    return [
        f"{key} {ours[key]} (paper: {paper})" for key, paper in paper_schedule.items() if ours[key] != paper
    ]
