"""Real data: a small ResNet learns Fashion-MNIST (Debian's files) within a CI budget.

ResNet-8 with the paper's recipe scaled to 300 iterations of batch 128 (0.64 epoch;
learning rate divided by 10 at 150 and 225) reached 22.7% test error on the project's
2-core CPU, in a few minutes; the bound leaves room for other machines' arithmetic.
"""

import json
import os
from pathlib import Path

import pytest

from resnet_jax import config as config_lib
from resnet_jax.evaluate import evaluate_workdir
from resnet_jax.train import train_and_evaluate
from tests.conftest import FASHION_MNIST_DIR

pytestmark = pytest.mark.fashion_mnist


def test_resnet8_learns_fashion_mnist(tmp_path):
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip(f"{FASHION_MNIST_DIR} missing: apt-get install -y dataset-fashion-mnist")
    config = config_lib.load(Path(__file__).parents[1] / "configs" / "fashion_mnist_resnet20.py")
    config_lib.apply_overrides(config, [
        ("model.name", "resnet8"), ("num_train_steps", "300"), ("log_every_steps", "50"),
        ("eval_every_steps", "300"), ("checkpoint_every_steps", "300"), ("tensorboard", "false"),
    ])
    assert config.dataset.data_dir == FASHION_MNIST_DIR  # found without a flag
    result = train_and_evaluate(config, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_errors = [line["train_error"] for line in lines if "train_error" in line]
    assert train_errors[-1] < train_errors[0] - 0.15
    assert result["eval_error"] < 0.30
    evaluated = evaluate_workdir(tmp_path)
    assert evaluated["num_examples"] == 10_000 and evaluated["error"] == result["eval_error"]
