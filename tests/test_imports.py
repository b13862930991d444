"""The package's imports run one way: no cycle, the models stand alone, and the parts
import each other as the README's layout section draws them.

Read from the source with `ast`, lazy imports inside functions included: a cycle that
is broken only by importing late is still a cycle.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "resnet_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(name: str) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative import"
            # `from package import module` imports the module; `from module import name`, the module.
            found.update(
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                for alias in node.names
            )
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for module in GRAPH[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_the_graph_is_read_from_the_source():
    assert "resnet_jax.state" in GRAPH["resnet_jax.checkpoint"]
    assert {"resnet_jax.checkpoint", "resnet_jax.state"} <= GRAPH["resnet_jax.train"]
    assert "resnet_jax.data.memory" in GRAPH["resnet_jax.train"]  # from resnet_jax.data import memory


def test_no_module_imports_itself_through_others():
    cycles = sorted(name for name in GRAPH if name in reachable(name))
    assert not cycles, f"import cycles through: {', '.join(cycles)}"


def test_the_models_import_no_cpu_code_data_training_or_checkpoints():
    forbidden = ("resnet_jax.cpu", "resnet_jax.data", "resnet_jax.train", "resnet_jax.checkpoint",
                 "resnet_jax.state")
    for models in ("resnet_jax.models", "resnet_jax"):  # `import resnet_jax` runs the package's __init__
        reached = reachable(models)
        assert not [m for m in reached if any(m == f or m.startswith(f + ".") for f in forbidden)], reached


# The README's layout picture: each part's modules (by name prefix) and the parts below it
# that it may import. A module in none of them fails the test: place it in the picture.
PARTS = {
    "commands": ("resnet_jax.cli", "resnet_jax.evaluate", "resnet_jax.experiments", "resnet_jax.plot",
                 "resnet_jax.installs"),
    "training": ("resnet_jax.train", "resnet_jax.metrics", "resnet_jax.scoring", "resnet_jax.preemption"),
    "checkpoints": ("resnet_jax.checkpoint", "resnet_jax.workdir", "resnet_jax.integrity"),
    "run": ("resnet_jax.state", "resnet_jax.config", "resnet_jax.schedules", "resnet_jax.backend",
            "resnet_jax.compile_cache"),
    "models": ("resnet_jax.models", "resnet_jax.complexity", "resnet_jax.convert", "resnet_jax.summary"),
    "data": ("resnet_jax.data",),
    "cpu": ("resnet_jax.cpu",),
    "devices": ("resnet_jax.parallel",),
}
BELOW = {
    "commands": {"training", "checkpoints", "run", "models", "data", "devices"},
    "training": {"checkpoints", "run", "models", "data", "devices"},
    "checkpoints": {"run", "devices"},
    "run": {"models", "data", "cpu", "devices"},
    "data": {"devices"},
    "models": set(),
    "cpu": set(),
    "devices": set(),
}


def part_of(module: str) -> str | None:
    if module == "resnet_jax":  # the package's __init__: the public model API
        return "models"
    for part, prefixes in PARTS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return part
    return None


def test_every_import_goes_down_the_layout_picture():
    unplaced = sorted(m for m in GRAPH if part_of(m) is None)
    assert not unplaced, f"modules missing from the layout picture (PARTS, README): {unplaced}"
    upward = sorted(
        f"{module} ({part_of(module)}) imports {target} ({part_of(target)})"
        for module, targets in GRAPH.items() for target in targets
        if part_of(target) not in BELOW[part_of(module)] | {part_of(module)}
    )
    assert not upward, upward


def test_only_the_backend_module_reaches_the_cpu_code():
    importers = {m for m, targets in GRAPH.items() if part_of(m) != "cpu"
                 and any(part_of(t) == "cpu" for t in targets)}
    assert importers == {"resnet_jax.backend"}
