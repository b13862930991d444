"""Where a result came from: the exact command, the machine, the date, the wall time and
the versions, recorded at the top of every results file."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
from collections.abc import Sequence
from importlib import metadata

VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def provenance(argv: Sequence[str], wall_s: float) -> dict:
    import jax

    devices = jax.devices()
    kinds = sorted({device.device_kind for device in devices})
    versions = {"python": platform.python_version()}
    for package in VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "command": shlex.join(["python", "-m", "resnet_jax.experiments", *argv]),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": round(wall_s, 1),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "devices": f"{len(devices)} x {' / '.join(kinds)} ({devices[0].platform})",
        },
        "versions": versions,
    }


def markdown(record: dict) -> str:
    """The record as the lines under a results file's title."""
    machine = record["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in record["versions"].items())
    minutes, seconds = divmod(round(record["wall_s"]), 60)
    return (
        f"```bash\n{record['command']}\n```\n\n"
        f"- Machine: {machine['platform']}, {machine['cpu_count']} CPU cores, "
        f"devices: {machine['devices']}\n"
        f"- Date: {record['date_utc']}; wall time of this command: {minutes} min {seconds} s\n"
        f"- Versions: {versions}\n"
    )
