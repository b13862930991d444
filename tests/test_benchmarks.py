"""The benchmark scripts run as documented and print one sane JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import resnet_jax as rj

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def last_json_line(script: str, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_train_throughput_times_the_training_step():
    line = last_json_line(
        "train_throughput.py", "--model=resnet8", "--batch_size=8", "--steps=2", "--image_size=16",
        "--steps_per_dispatch=2",
    )
    for key in ("images_per_sec", "step_ms", "compile_s", "achieved_flops_per_sec"):
        assert line[key] > 0, key
    assert line["images_per_sec"] == pytest.approx(8 / (line["step_ms"] / 1e3))
    assert line["macs_per_image"] == rj.count_macs(rj.create_model("resnet8"), (1, 16, 16, 3))
    assert line["peak_memory_bytes"] is None or line["peak_memory_bytes"] > 0
    flops = 6 * line["macs_per_image"] * line["images_per_sec"]  # the documented convention
    assert line["achieved_flops_per_sec"] == pytest.approx(flops)
    assert isinstance(line["device"], str) and line["jax_version"]
    assert (line["model"], line["batch_size"], line["steps"], line["image_size"], line["conv"]) == (
        "resnet8", 8, 2, 16, "auto"
    )


@pytest.mark.torch
def test_torch_reference_times_the_same_network():
    line = last_json_line("torch_resnet20.py", "--depth=8", "--batch_size=8", "--steps=2", "--image_size=16")
    for key in ("images_per_sec", "step_ms", "warmup_s", "achieved_flops_per_sec"):
        assert line[key] > 0, key
    assert line["macs_per_image"] == rj.count_macs(rj.create_model("resnet8"), (1, 16, 16, 3))
    assert (line["depth"], line["threads"]) == (8, 2)


@pytest.mark.dali
def test_dali_pipeline_times_the_host_plan_and_the_whole_pipeline():
    line = last_json_line("dali_pipeline.py", "--threads", "1", "2", "--batch=8", "--batches=1",
                          "--images=16")
    assert (line["platform"], line["augment"], line["batch"]) == ("cpu", "scale_crop_flip", 8)
    assert line["plan_images_per_sec"] > 0 and set(line["images_per_sec"]) == {"1", "2"}
    assert all(rate > 0 for rate in line["images_per_sec"].values())


@pytest.mark.grain
def test_worker_startup_measures_the_descriptors_the_check_counts():
    from resnet_jax.data import pool_limits

    line = last_json_line("worker_startup.py", "--workers", "1", "2", "--records", "100000")
    assert line["per_worker"]["pool_fds"] == pytest.approx(pool_limits.FDS_PER_WORKER)
    # One mapped ring per worker, and the rings' control block (its file and mapping).
    assert line["per_worker"]["ring_fds"] == pytest.approx(pool_limits.RING_FDS_PER_WORKER)
    assert line["fixed"]["ring_fds"] == pytest.approx(2)
    assert line["trainer_fds_before_pool"] + 2 < pool_limits.FIXED_FDS
    # A worker: its ring's file and mapping, the control block's and the file list's mappings.
    assert line["worker_memfd_fds"] == 4
    for run in line["runs"]:  # every piece in the rings: no shared-memory block
        assert run["fds_full"]["shm"] == 0
        assert run["first_batch_s"] > 0 and run["worker_cpu_s"] > 0 and run["worker_pss"] > 0
    copy = line["dataset_copy"]  # the 100,000 paths stay behind, mapped by every worker, not copied
    assert copy["bytes"] < copy["shared_bytes"] / 10 and copy["resident_bytes"] < copy["shared_bytes"] / 10
    assert copy["shared_bytes"] > 100_000 * len("n00000000_99999.JPEG")
