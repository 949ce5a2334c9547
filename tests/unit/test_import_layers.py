# pptk's rooms import one way, from the command line down to errors and logs: no module imports a room above its own.
import ast
from pathlib import Path

import pytest

import pptk

# Top to bottom. A room may import its own modules and any room below it, never one above or beside it.
LAYERS: list[set[str]] = [
    {"cli"},
    {"verify"},
    {"tasks"},
    {"training"},
    {"checkpoints"},
    {"parallel"},
    {"models"},
    {"launch"},
    {"data", "deepspeed_compat"},
    {"errors", "logs", "failpoints"},
]
PACKAGE = Path(pptk.__file__).parent


def _room(module: str) -> str:
    """pptk.training.trainer -> training; pptk.errors -> errors."""
    return module.split(".")[1]


def _tier(room: str) -> int:
    return next(index for index, rooms in enumerate(LAYERS) if room in rooms)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _pptk_imports(path: Path) -> list[tuple[int, str]]:
    """Every pptk module this file imports, at module level or inside functions (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "pptk" else [f"pptk.{alias.name}" for alias in node.names]
            found += [(node.lineno, name) for name in names if name.startswith("pptk.")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("pptk.")]
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if _module_name(p) != "pptk")


def test_every_room_has_a_place_in_the_order():
    rooms = {_room(_module_name(path)) for path in _modules()}
    placed = set().union(*LAYERS)
    assert rooms <= placed, f"rooms with no place in LAYERS: {sorted(rooms - placed)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_go_down(path: Path):
    room = _room(_module_name(path))
    upward = [
        f"line {line}: {name}"
        for line, name in _pptk_imports(path)
        if _room(name) != room and _tier(_room(name)) <= _tier(room)
    ]
    assert not upward, f"{path.name} ({room}) imports a room above or beside its own: {upward}"


def test_every_room_says_what_it_holds_and_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} has no docstring saying what the room holds"
        assert "May import" in doc, f"{init}'s docstring does not say what the room may import"
