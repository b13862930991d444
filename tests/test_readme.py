"""The README's Python snippets run as written (on tiny inputs where they name large ones)."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_jax.train import train_and_evaluate
from tests.fake_data import write_graded_fashion_mnist
from tests.test_train import tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(containing: str) -> str:
    """The README's one python block that contains `containing`."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    [block] = [block for block in blocks if containing in block]
    return block


def run(code: str, smaller: dict[str, str] | None = None) -> dict:
    """Execute `code`, each key of `smaller` replaced by its value (and required to be there)."""
    for large, small in (smaller or {}).items():
        assert large in code, f"the README no longer has {large!r}; update this test"
        code = code.replace(large, small)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_the_public_api_snippet_runs():
    names = run(snippet("rj.list_models()"), smaller={"(8, 224, 224, 3)": "(1, 32, 32, 3)"})
    assert names["logits"].shape == (1, 1000)
    assert names["rj"].count_params(names["variables"]["params"]) == 25557032


def test_the_checkpoint_snippet_runs_on_a_trained_workdir(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    data_dir = write_graded_fashion_mnist(tmp_path / "data", 0, 64, 20, gz=False)
    config = tiny_config(data_dir, num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2,
                         log_every_steps=2)
    monkeypatch.chdir(tmp_path)
    train_and_evaluate(config, "runs/fm20")
    names = run(snippet("checkpoint.load("))
    assert names["logits"].shape == (1, 10)
    assert names["config"].model.name == "resnet8"


@pytest.mark.torch
def test_the_torchvision_snippet_runs_on_a_saved_state_dict(tmp_path, monkeypatch):
    import torch

    from tests import torchvision_layout

    monkeypatch.chdir(tmp_path)
    torch.save(torchvision_layout.resnet(50).state_dict(), "resnet50.pth")
    names = run(snippet("torch.load("))
    assert names["model"].stage_sizes == (3, 4, 6, 3)  # ResNet-50
    assert np.shape(names["variables"]["params"]["fc"]["kernel"]) == (2048, 1000)


def test_the_nnx_snippet_trains_batch_norm_as_linen_does_and_evaluates_with_it():
    """The NNX module's train step moves its BN statistics exactly as Linen's mutable apply does."""
    from flax import nnx

    def linen_variables(model):
        params, batch_stats = nnx.state(model, nnx.Param, nnx.BatchStat)
        return {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}

    code = snippet("nnx.bridge.ToNNX(")
    initialized = run(code.split("logits = model(x, train=True", 1)[0])
    before = linen_variables(initialized["model"])
    names = run(code)
    rj, x, after = names["rj"], names["x"], linen_variables(names["model"])
    linen = rj.create_model("resnet20", num_classes=10)
    _, updates = linen.apply(before, x, train=True, mutable=["batch_stats"])
    leaves = jax.tree_util.tree_leaves
    assert all(np.asarray(leaf).any() for leaf in leaves(updates["batch_stats"]))  # they moved
    for got, want in zip(leaves(after["batch_stats"]), leaves(updates["batch_stats"]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(leaves(after["params"]), leaves(before["params"]), strict=True):
        np.testing.assert_array_equal(got, want)
    assert rj.count_params(after["params"]) == rj.count_params(
        linen.init(jax.random.key(1), x, train=False)["params"])
    # Eval mode reads the updated statistics, as Linen's apply does:
    assert names["logits"].shape == (8, 10)
    np.testing.assert_allclose(names["logits"], linen.apply(after, x, train=False), rtol=1e-5, atol=1e-5)
