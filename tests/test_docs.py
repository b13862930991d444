"""docs/training.md's table of config keys agrees with the schema (`config.base_config`):
every key documented once, no key that does not exist, and the defaults it shows."""

import ast
import operator
import re
from pathlib import Path

import pytest

from resnet_jax import config as config_lib

TRAINING_MD = Path(__file__).resolve().parents[1] / "docs" / "training.md"
TABLE_HEADING = "Keys every config has"


def _table_rows() -> list[tuple[str, str]]:
    """(keys cell, default cell) of each row of the key table under its heading."""
    text = TRAINING_MD.read_text()
    assert TABLE_HEADING in text, f"docs/training.md no longer has {TABLE_HEADING!r}; update this test"
    lines = text[text.index(TABLE_HEADING):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| key |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        rows.append((cells[0], cells[1]))
    return rows


def _keys(cell: str) -> list[str]:
    """The dotted keys a cell names: `dataset.image_size`, `scale_range` is
    dataset.image_size, dataset.scale_range (a name without a prefix takes the last one)."""
    keys, prefix = [], ""
    for name in re.findall(r"`([^`]+)`", cell):
        if "." in name:
            prefix = name.rsplit(".", 1)[0] + "."
            keys.append(name)
        else:
            keys.append(prefix + name)
    return keys


def _split_top_level(cell: str) -> list[str]:
    """`a, (b, c), d` -> ['a', '(b, c)', 'd']."""
    parts, depth, current = [], 0, ""
    for char in cell:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return parts + [current.strip()]


_OPERATORS = {ast.Div: operator.truediv}


def _literal(node: ast.AST):
    """A number (-1 too), bool, tuple, or a fraction of numbers (3/4), as Python has it."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand)
    if isinstance(node, ast.Tuple):
        return tuple(_literal(element) for element in node.elts)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_literal(node.left), _literal(node.right))
    raise ValueError(ast.dump(node))


def _value(text: str):
    """A default as the table writes it: `name` or `""` for strings, else a Python literal."""
    text = text.strip("`")
    if text == '""':
        return ""
    try:
        return _literal(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError):
        return text


def _documented() -> dict[str, object]:
    """{key: the default the table shows}: one value per key, or one for every key of a row."""
    documented = {}
    for keys_cell, default_cell in _table_rows():
        keys = _keys(keys_cell)
        values = [_value(part) for part in _split_top_level(default_cell)]
        assert len(values) in (1, len(keys)), (
            f"row {keys_cell!r}: {len(values)} defaults for {len(keys)} keys ({default_cell!r})")
        for key, value in zip(keys, values * len(keys) if len(values) == 1 else values, strict=True):
            assert key not in documented, f"{key} is documented twice"
            documented[key] = value
    return documented


def _schema() -> dict[str, object]:
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            if hasattr(value, "items"):
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value

    walk("", config_lib.base_config())
    return flat


def test_the_key_table_documents_every_key_of_the_schema_and_no_other():
    documented, schema = set(_documented()), set(_schema())
    missing, unknown = sorted(schema - documented), sorted(documented - schema)
    assert not missing, f"keys missing from docs/training.md's table: {missing}"
    assert not unknown, f"keys in docs/training.md's table that do not exist: {unknown}"


@pytest.mark.parametrize("key", sorted(_schema()))
def test_the_key_table_shows_each_default_of_the_schema(key):
    documented, default = _documented(), _schema()[key]
    assert key in documented, f"{key} is missing from docs/training.md's table"
    shown = documented[key]
    if isinstance(default, list | tuple):
        default = tuple(default)
    # 0 may stand for 0.0, never False for 0 or 0 for False.
    same_type = type(shown) is type(default) or (type(default) is float and type(shown) is int)
    assert shown == default and same_type, f"{key}: the table shows {shown!r}, the schema has {default!r}"
