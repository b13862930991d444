"""The README's Python snippets run as written (on tiny inputs where they name large ones)."""

import re
from pathlib import Path

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
    names = run(snippet("rj.create_model("), smaller={"(8, 224, 224, 3)": "(1, 32, 32, 3)"})
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
