"""The `responses` experiment (the paper's Figure 7): the standard deviation of every 3x3
layer's response, the output of its BN before ReLU or the shortcut's addition, of a
trained net on test images.

The std of one layer is taken over all its values (images x positions x channels), on
the first `num_images` images of the eval split, normalised as in training, with the
network in inference mode (BN uses its running statistics). The models sow these
responses into `models.RESPONSES`; the moments are accumulated batch by batch (Chan's
pairwise update, in float64 on the host), so no layer's responses are ever held whole.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import backend, checkpoint
from resnet_jax.data.augment import normalization_stats, normalize
from resnet_jax.data.sources import load_split
from resnet_jax.experiments.nets import Net
from resnet_jax.models import RESPONSES, ResNet
from resnet_jax.plot import new_figure, save_figure

STEM_RESPONSE = "stem_response"  # where models.ResNet sows the CIFAR stem's response
_BLOCK = re.compile(r"conv(\d+)_(\d+)")
# Plain nets dashed, ResNets solid, one colour per depth: the paper's Figure 7 pairs them.
LINE_STYLES = {"plain": "--", "resnet": "-"}
FIGURE_SIZE = (7.0, 7.5)
# Images per forward pass: a batch's responses of every layer are held at once (ResNet-110
# on 32x32 images: about 4 MB per image).
BATCH_SIZE = 128


def ordered_responses(intermediates: dict) -> list[tuple[str, jax.Array]]:
    """Each 3x3 layer's response in network order: the stem ("conv1"), then block by block
    (stage, then block), each block's 3x3 layers in the order they run ("conv2_1/1" is the
    first 3x3 layer of block conv2_1). Flax keeps the collection's keys sorted by name,
    which is not network order ("conv2_10" before "conv2_2")."""
    layers = [("conv1", intermediates[STEM_RESPONSE][0])] if STEM_RESPONSE in intermediates else []
    blocks = sorted(
        (name for name in intermediates if _BLOCK.fullmatch(name)),
        key=lambda name: tuple(int(part) for part in _BLOCK.fullmatch(name).groups()),
    )
    for block in blocks:
        for index, response in enumerate(intermediates[block]["response"], start=1):
            layers.append((f"{block}/{index}", response))
    return layers


def response_shapes(model: ResNet, variables: dict, image_shape: Sequence[int]) -> list[tuple[str, Any]]:
    """(name, shape and dtype of its response to one image) for each 3x3 layer, in order."""
    shapes = jax.eval_shape(
        lambda x: model.apply(variables, x, train=False, mutable=[RESPONSES])[1][RESPONSES],
        jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
    )
    return ordered_responses(shapes)


def response_stds(
    model: ResNet, variables: dict, images: np.ndarray, mean: np.ndarray, std: np.ndarray, batch_size: int,
    compiler_options: dict[str, str],
) -> tuple[list[str], np.ndarray]:
    """(layer names, std of each layer's response) over uint8 `images`, normalised by
    (mean, std) as in training, in inference mode; compiled with `compiler_options`, those
    of the model's convolution path (`backend.compiler_options`)."""

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def moments(variables, batch):
        _, state = model.apply(variables, normalize(batch, mean, std), train=False, mutable=[RESPONSES])
        layers = [response.astype(jnp.float32) for _, response in ordered_responses(state[RESPONSES])]
        means = jnp.stack([layer.mean() for layer in layers])
        squares = jnp.stack([jnp.sum((layer - m) ** 2) for layer, m in zip(layers, means, strict=True)])
        return means, squares

    layers = response_shapes(model, variables, images.shape[1:])
    values_per_image = np.array([np.prod(shape.shape[1:]) for _, shape in layers], np.float64)
    count, total_mean, total_squares = 0, np.zeros(len(layers)), np.zeros(len(layers))
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        fetched = jax.device_get(moments(variables, jnp.asarray(batch)))
        means, squares = (np.asarray(value, np.float64) for value in fetched)
        # Chan et al.'s update of (mean, sum of squared deviations) with the batch's values.
        seen, new = count * values_per_image, len(batch) * values_per_image
        delta = means - total_mean
        total_mean = total_mean + delta * new / (seen + new)
        total_squares = total_squares + squares + delta**2 * seen * new / (seen + new)
        count += len(batch)
    return [name for name, _ in layers], np.sqrt(total_squares / (count * values_per_image))


def eval_images(config: ml_collections.ConfigDict, num_images: int | None):
    """(uint8 images, mean, std): the first `num_images` of the eval split (all when None),
    and the training split's normalisation statistics."""
    data_dir = config.dataset.data_dir or None
    train = load_split(config.dataset.name, config.dataset.train_split, data_dir)
    mean, std = normalization_stats(train.images, config.dataset.normalization)
    images = load_split(config.dataset.name, config.dataset.eval_split, data_dir).images
    return images[:num_images], mean, std


def measure(nets: Sequence[Net], num_images: int | None) -> tuple[list[dict], int]:
    """Each net's per-layer response std, from its seed-0 run's final checkpoint."""
    config = nets[0].runs[0].config
    images, mean, std = eval_images(config, num_images)
    records = []
    for net in nets:
        run = net.runs[0]
        model, variables, run_config = checkpoint.load(run.workdir, run.config.num_train_steps)
        names, stds = response_stds(model, variables, images, mean, std, BATCH_SIZE,
                                    backend.compiler_options(run_config.model.conv))
        records.append({
            "net": net.label,
            "model": net.model,
            "kind": net.kind,
            "depth": net.depth,
            "workdir": f"runs/{run.name}",
            "layers": names,
            "std": [round(float(value), 6) for value in stds],
            "std_sorted": [round(float(value), 6) for value in sorted(stds, reverse=True)],
        })
    return records, len(images)


def markdown_table(records: Sequence[dict]) -> str:
    head = ["net", "3x3 layers", "mean std", "min", "max", "first layer", "last layer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for record in records:
        stds = record["std"]
        cells = [record["net"], str(len(stds)), f"{np.mean(stds):.3f}", f"{min(stds):.3f}",
                 f"{max(stds):.3f}", f"{stds[0]:.3f}", f"{stds[-1]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(records: Sequence[dict], out: Path, title: str) -> Path:
    """Figure 7: std by layer index (top) and sorted by magnitude (bottom)."""
    figure = new_figure(FIGURE_SIZE)  # first: it names the install command if matplotlib is missing
    import matplotlib

    by_index, by_size = figure.subplots(2, 1)
    depths = sorted({record["depth"] for record in records})
    colors = dict(zip(depths, matplotlib.colormaps["tab10"].colors, strict=False))
    for record in records:
        style = dict(color=colors[record["depth"]], linestyle=LINE_STYLES[record["kind"]],
                     label=record["net"])
        layers = range(1, len(record["std"]) + 1)
        by_index.plot(layers, record["std"], **style)
        by_size.plot(layers, record["std_sorted"], **style)
    by_index.set_xlabel("layer index (original)")
    by_size.set_xlabel("layer index (sorted by magnitude)")
    for ax in (by_index, by_size):
        ax.set_ylabel("std")
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(title)
    return save_figure(figure, out)
