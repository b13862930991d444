"""benchmarks/device_check.py: its --smoke run takes every path of the accelerator check on
this CPU and writes the JSON report and the table; bad input is refused before any work."""

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import resnet_jax as rj
from tests.fake_data import write_graded_fashion_mnist

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "device_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fashion_mnist(tmp_path_factory):
    return write_graded_fashion_mnist(tmp_path_factory.mktemp("fake_fashion_mnist"), 0, 64, 40, gz=True)


@pytest.fixture(scope="module")
def smoke(fashion_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", f"--out={out}", f"--fashion_mnist_dir={fashion_mnist}"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_smoke_run_reports_every_phase(smoke):
    out, _ = smoke
    report = json.loads((out / "device_check.json").read_text())
    env, imagenet, cifar = report["environment"], report["imagenet"], report["cifar"]
    assert env["num_devices"] >= 1 and env["device_kind"] and env["versions"]["jax"]
    assert report["flags"]["smoke"] is True and report["flags"]["budget_s"] == 600

    assert (imagenet["model"], imagenet["dtype"], imagenet["image_size"]) == ("resnet8", "bfloat16", 32)
    assert imagenet["batch_size"] == 4 * env["num_devices"]
    assert imagenet["compile_s"] > 0
    for way in ("on_device", "from_host"):
        assert imagenet[way]["images_per_sec"] == pytest.approx(
            imagenet["batch_size"] / (imagenet[way]["step_ms"] / 1e3))
    loaders = imagenet["loaders"]
    assert list(loaders) == ["grain", "dali"]
    if importlib.util.find_spec("grain") and importlib.util.find_spec("PIL"):
        grain = loaders["grain"]
        assert grain["images_per_sec"] == pytest.approx(imagenet["batch_size"] / (grain["step_ms"] / 1e3))
        assert grain["workers"] == 1 and grain["images_in_folder"] == 8 and grain["open_s"] > 0
    else:
        assert "grain" in loaders["grain"]["skipped"]
    # Where DALI is installed, it runs (on the CPU here): test_smoke_run_times_dali.
    if not importlib.util.find_spec("nvidia") or not importlib.util.find_spec("nvidia.dali"):
        assert loaders["dali"]["skipped"].startswith("NVIDIA DALI is not installed (pip install -e '.[dali]'")
    macs = rj.count_macs(rj.create_model("resnet8", num_classes=1000), (1, 32, 32, 3))
    assert imagenet["macs_per_image"] == macs
    achieved = 6 * macs * imagenet["on_device"]["images_per_sec"]
    assert imagenet["achieved_flops_per_sec"] == pytest.approx(achieved)
    # The CPU has no published bf16 peak: MFU is null, and the report says why.
    assert imagenet["mfu"] is None and "no published bf16 peak" in imagenet["peak_flops_source"]

    assert cifar["model"] == "resnet8" and set(cifar["throughput"]) == {"1", "2"}
    for timing in cifar["throughput"].values():
        assert timing["projected_schedule_s"] == pytest.approx(4 * timing["step_ms"] / 1e3)
    schedule = cifar["schedule"]
    assert schedule["steps_per_dispatch"] == cifar["fastest_steps_per_dispatch"]
    assert schedule["seconds"] > 0 and 0 <= schedule["test_error"] <= 1
    for phase in ("environment", "imagenet", "cifar"):
        assert report[phase]["phase_s"] >= 0, phase
    assert report["total_s"] >= report["imagenet"]["phase_s"] + report["cifar"]["phase_s"]


@pytest.mark.dali
def test_smoke_run_times_dali(smoke):
    out, _ = smoke
    report = json.loads((out / "device_check.json").read_text())
    imagenet, dali = report["imagenet"], report["imagenet"]["loaders"]["dali"]
    assert dali["images_per_sec"] == pytest.approx(imagenet["batch_size"] / (dali["step_ms"] / 1e3))
    assert (dali["decoder"], dali["threads"], dali["images_in_folder"]) == ("cpu", 1, 8)
    table = (out / "device_check.md").read_text()
    assert "| resnet8 images/s, DALI loader | " in table and "(decoding cpu, 1 CPU threads) |" in table


def test_smoke_run_writes_and_prints_the_table(smoke):
    out, stdout = smoke
    table = (out / "device_check.md").read_text()
    assert table in stdout
    assert table.splitlines()[:2] == ["| what | figure |", "|---|---|"]
    assert "| resnet8 images/s, batch on device |" in table
    assert "| resnet8 images/s, Grain loader |" in table and "| resnet8 images/s, DALI loader |" in table
    assert "| resnet8 4-step schedule |" in table and "test error" in table
    assert "| resnet8 MFU (bf16, batch on device) | - (no published bf16 peak" in table


def test_table_names_a_skipped_schedule_and_the_peak_used(smoke):
    out, _ = smoke
    report = json.loads((out / "device_check.json").read_text())
    report = copy.deepcopy(report)
    report["cifar"]["schedule"] = {"skipped": "needs about 200 s, 150 s of --budget_s=420 left"}
    report["imagenet"].update(mfu=0.5, peak_flops_per_device=989e12)
    report["imagenet"]["loaders"] = {
        "grain": {"images_per_sec": 2345.6, "workers": 15},
        "dali": {"failed": "DALI could not start its pipeline on cuda:0"},
    }
    table = load_script().table(report)
    assert "| resnet8 images/s, Grain loader | 2,346 (15 decoding processes) |" in table
    assert "| resnet8 images/s, DALI loader | failed: DALI could not start its pipeline on cuda:0 |" in table
    report["imagenet"]["loaders"] = {"dali": {"images_per_sec": 7000.4, "decoder": "mixed", "threads": 15}}
    table = load_script().table(report)
    assert "| resnet8 images/s, DALI loader | 7,000 (decoding mixed, 15 CPU threads) |" in table
    assert "Grain loader" not in table
    assert "4-step schedule | skipped: needs about 200 s, 150 s of --budget_s=420 left |" in table
    assert "| resnet8 MFU (bf16, batch on device) | 50.0% of 989 TFLOP/s |" in table


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None),
])
def test_peak_flops_by_device_kind(kind, peak):
    assert load_script().peak_flops(kind)[0] == peak


def test_bad_input_is_refused_before_any_work(fashion_mnist, tmp_path, capsys):
    script = load_script()
    with pytest.raises(SystemExit):
        script.parse_args([f"--out={tmp_path}", "--smoke", f"--fashion_mnist_dir={tmp_path / 'absent'}"])
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "device_check.json").write_text("{}")
    with pytest.raises(SystemExit):
        script.parse_args([f"--out={tmp_path}", "--smoke", f"--fashion_mnist_dir={fashion_mnist}"])
    assert "exists; pass an empty or new --out folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args([f"--out={tmp_path / 'new'}", "--smoke", f"--fashion_mnist_dir={fashion_mnist}",
                           "--cifar_steps_per_dispatch=3"])
    assert "must divide --cifar_steps=2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args([f"--out={tmp_path / 'new'}", "--smoke", f"--fashion_mnist_dir={fashion_mnist}",
                           "--loaders=grain,nvjpeg"])
    assert "--loaders=grain,nvjpeg: comma-separated names among grain, dali" in capsys.readouterr().err
