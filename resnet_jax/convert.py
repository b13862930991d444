"""Import torchvision ResNet weights (resnet18 ... resnet152) into this package's layout.

    import torch, torchvision
    from resnet_jax import convert
    variables = convert.from_torchvision(torchvision.models.resnet50(weights=...).state_dict())
    model = convert.model_for(state_dict)            # the matching flax module

torchvision's nets are the v1.5 bottleneck (stride on the 3x3) with option B shortcuts,
which is `create_model("resnetD")` with its defaults. torch is imported only when the
state dict holds torch tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import IMAGENET_STAGES, ResNet, create_model

# torchvision module name -> this package's, inside one block.
_BLOCK_MODULES = {
    "conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2", "conv3": "conv3",
    "bn3": "bn3", "downsample.0": "shortcut_conv", "downsample.1": "shortcut_bn",
}
# torchvision tensor name -> (collection, flax leaf name), per kind of module.
_CONV = {"weight": ("params", "kernel")}
_BN = {
    "weight": ("params", "scale"), "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
}
_FC = {"weight": ("params", "kernel"), "bias": ("params", "bias")}
# Present in every torchvision BN, with no counterpart here (flax keeps no counter).
_IGNORED_SUFFIX = ".num_batches_tracked"
_BLOCK_KEY = re.compile(r"layer(\d)\.(\d+)\.")


def _architecture(state_dict: Mapping[str, Any]) -> tuple[int, int]:
    """(depth, num_classes) of the torchvision ResNet that `state_dict` belongs to."""
    blocks_per_stage = [0, 0, 0, 0]
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match and 1 <= int(match.group(1)) <= 4:
            stage, block = int(match.group(1)) - 1, int(match.group(2))
            blocks_per_stage[stage] = max(blocks_per_stage[stage], block + 1)
    bottleneck = any(".conv3." in key for key in state_dict)
    layout = ("bottleneck" if bottleneck else "basic", tuple(blocks_per_stage))
    depths = {spec: depth for depth, spec in IMAGENET_STAGES.items()}
    if layout not in depths:
        known = ", ".join(f"resnet{d}: {b} {s}" for d, (b, s) in IMAGENET_STAGES.items())
        raise ValueError(
            f"state dict is not a torchvision ResNet: found {layout[0]} blocks "
            f"{layout[1]} in layer1..layer4; accepted: {known}"
        )
    if "fc.weight" not in state_dict:
        raise ValueError("state dict has no 'fc.weight', so the number of classes is unknown")
    return depths[layout], int(np.shape(state_dict["fc.weight"])[0])


def model_for(state_dict: Mapping[str, Any]) -> ResNet:
    """The `ResNet` whose variables `from_torchvision(state_dict)` returns."""
    depth, num_classes = _architecture(state_dict)
    return create_model(f"resnet{depth}", num_classes=num_classes)


def _torch_names(path: tuple[str, ...]) -> tuple[str, dict]:
    """torchvision's module name for a flax module path, and its tensor-name table."""
    top = path[0]
    if top in ("conv1", "bn1", "fc"):
        return top, {"conv1": _CONV, "bn1": _BN, "fc": _FC}[top]
    stage, block = (int(i) for i in re.fullmatch(r"conv(\d)_(\d+)", top).groups())
    inner = {v: k for k, v in _BLOCK_MODULES.items()}[path[1]]
    table = _CONV if "conv" in inner or inner == "downsample.0" else _BN
    return f"layer{stage - 1}.{block - 1}.{inner}", table


def _to_numpy(value: Any) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        import torch  # only when the caller handed us torch tensors

        if isinstance(value, torch.Tensor):
            return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _from_torch_layout(value: np.ndarray, flax_leaf: str, ndim: int) -> np.ndarray:
    if flax_leaf == "kernel" and ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if flax_leaf == "kernel":
        return value.T  # (out, in) -> (in, out)
    return value


def from_torchvision(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """torchvision ResNet state dict -> {'params', 'batch_stats'} for `model_for(state_dict)`.

    Values may be numpy arrays or torch tensors. Raises ValueError listing every
    missing, unexpected or mis-shaped key when the dict does not match the model exactly.
    """
    depth, num_classes = _architecture(state_dict)
    model = create_model(f"resnet{depth}", num_classes=num_classes)
    expected = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((1, 64, 64, 3))
    )
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    wanted, misshaped = set(), []
    module_paths = {
        tuple(k.key for k in path[:-1])
        for path, _ in jax.tree_util.tree_flatten_with_path(expected["params"])[0]
    }
    for module_path in sorted(module_paths):
        module, table = _torch_names(module_path)
        for torch_leaf, (collection, flax_leaf) in table.items():
            key = f"{module}.{torch_leaf}"
            wanted.add(key)
            if key not in state_dict:
                continue
            shape = _subtree(expected[collection], module_path)[flax_leaf].shape
            value = _from_torch_layout(_to_numpy(state_dict[key]), flax_leaf, len(shape))
            if value.shape != shape:
                given_shape = tuple(np.shape(state_dict[key]))
                misshaped.append(f"{key} {given_shape} (expected {shape} as {flax_leaf})")
                continue
            _subtree(variables[collection], module_path, create=True)[flax_leaf] = jnp.asarray(value)

    given = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIX)}
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    if missing or unexpected or misshaped:
        problems = [
            f"{label} ({len(keys)}): {', '.join(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if keys
        ]
        raise ValueError(f"state dict does not match torchvision's resnet{depth}: " + "; ".join(problems))
    return variables


def _subtree(tree: dict, path: tuple[str, ...], create: bool = False) -> dict:
    for name in path:
        tree = tree.setdefault(name, {}) if create else tree[name]
    return tree
