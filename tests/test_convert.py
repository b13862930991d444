"""torchvision weights -> resnet_jax: same eval-mode logits, and clear errors on bad dicts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import convert

torch = pytest.importorskip("torch", reason="needs torch: make test REQUIRE=torch installs torch")
pytestmark = pytest.mark.torch
from tests import torchvision_layout  # noqa: E402  (needs torch)


def randomized_torch_resnet(depth: int, num_classes: int, seed: int):
    """A torchvision-layout net with random weights and random BN statistics, eval mode."""
    torch.manual_seed(seed)
    net = torchvision_layout.resnet(depth, num_classes)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize("depth", [18, 50])
def test_logits_match_torchvision(depth):
    net = randomized_torch_resnet(depth, num_classes=37, seed=depth)
    images = np.random.default_rng(0).normal(size=(2, 3, 96, 112)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(images)).numpy()

    state_dict = net.state_dict()
    model = convert.model_for(state_dict)
    variables = convert.from_torchvision(state_dict)
    logits = model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), train=False)

    assert logits.shape == (2, 37)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4 * scale)


def test_numpy_arrays_convert_like_tensors():
    state_dict = randomized_torch_resnet(18, num_classes=5, seed=1).state_dict()
    from_tensors = convert.from_torchvision(state_dict)
    from_numpy = convert.from_torchvision({k: v.numpy() for k, v in state_dict.items()})
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_tensors, from_numpy)


def test_bad_state_dicts_are_reported_key_by_key():
    state_dict = {k: v.numpy() for k, v in torchvision_layout.resnet(18, 10).state_dict().items()}
    del state_dict["layer2.0.downsample.1.running_var"]
    state_dict["layer9.extra.weight"] = np.zeros(3)
    state_dict["layer1.0.conv1.weight"] = np.zeros((64, 64, 5, 5), np.float32)
    with pytest.raises(ValueError) as error:
        convert.from_torchvision(state_dict)
    message = str(error.value)
    assert "resnet18" in message
    assert "missing (1): layer2.0.downsample.1.running_var" in message
    assert "unexpected (1): layer9.extra.weight" in message
    assert "mis-shaped (1): layer1.0.conv1.weight (64, 64, 5, 5)" in message


def test_unknown_layout_is_refused():
    state_dict = torchvision_layout.resnet(34, 10).state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("layer3.5.")}
    with pytest.raises(ValueError, match=r"basic blocks \(3, 4, 5, 3\).*resnet34: basic \(3, 4, 6, 3\)"):
        convert.from_torchvision(state_dict)
