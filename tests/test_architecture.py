"""The house rules of ARCHITECTURE.md, checked on the source: which floor may import which, and no cycles.

Imports inside functions count too: dsfuse imports heavy modules lazily, and a lazy import is still
a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "dsfuse"

# floor -> the dsfuse modules it may import (its own floor always included)
ALLOWED = {
    "nn": {"dsfuse.nn", "dsfuse.errors", "dsfuse.choices"},
    "diffusion": {"dsfuse.diffusion", "dsfuse.nn", "dsfuse.models", "dsfuse.errors", "dsfuse.choices",
                  "dsfuse.io", "dsfuse.checkpoint"},
    "models": {"dsfuse.models", "dsfuse.nn", "dsfuse.errors", "dsfuse.choices", "dsfuse.io", "dsfuse.checkpoint",
               "dsfuse.metrics"},
}
# nothing below these floors may import them
UPPER_FLOORS = {"dsfuse.cli": {"cli", "agent", "__main__"}, "dsfuse.tasks": {"tasks", "cli", "agent"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The dsfuse modules `path` imports, resolved to files (a `from pkg import name` names pkg.name
    when that is a module, else pkg)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != "dsfuse"}


GRAPH = {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def floor(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


@pytest.mark.parametrize("low", sorted(ALLOWED))
def test_lower_floors_import_only_what_is_below_them(low):
    wrong = [f"{m} imports {target}" for m, targets in GRAPH.items() if floor(m) == low
             for target in targets if not any(target == a or target.startswith(a + ".") for a in ALLOWED[low])]
    assert not wrong, wrong


@pytest.mark.parametrize("upper", sorted(UPPER_FLOORS))
def test_nothing_below_the_command_layers_imports_them(upper):
    wrong = [f"{m} imports {target}" for m, targets in GRAPH.items() if floor(m) not in UPPER_FLOORS[upper]
             for target in targets if target == upper or target.startswith(upper + ".")]
    assert not wrong, wrong


def test_no_circular_imports():
    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in GRAPH.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted({m for m in GRAPH if m in reaches(m)})
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_benches_and_scripts_import_no_command_module():
    wrong = [f"{p.name}: {node.module}" for folder in ("bench", "scripts") for p in (REPO / folder).glob("*.py")
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dsfuse.cli")]
    assert not wrong, wrong


def test_a_cycle_is_caught(tmp_path, monkeypatch):
    """The cycle check itself can fail."""
    monkeypatch.setitem(GRAPH, "dsfuse.a", {"dsfuse.b"})
    monkeypatch.setitem(GRAPH, "dsfuse.b", {"dsfuse.a"})
    with pytest.raises(AssertionError, match="dsfuse.a"):
        test_no_circular_imports()
