"""The import graph of `reasonguard.train`: no import circle at import time, and none at all
through the planning modules (the memory model, the tables, the time model, the plan and the
decisions that use its estimates), function-level imports included.

The graph is read from the source with `ast`, so it shows imports a run never reaches too; each
planning module is also imported alone in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "reasonguard"
PLANNING = [
    "reasonguard.plan.hardware",
    "reasonguard.plan.batch_profile",
    "reasonguard.plan.memory",
    "reasonguard.plan.timing",
    "reasonguard.plan.report",
    "reasonguard.plan.target",
    "reasonguard.plan.fit",
    "reasonguard.plan.estimate",
    "reasonguard.plan.decisions",
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, module_level_only: bool) -> set[str]:
    """The reasonguard modules a file imports (at import time only, or anywhere in it)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in MODULES:  # `from a.b import c`: c may be a name in a.b
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level_only and isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            ):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0]
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:
                    add(f"{base}.{alias.name}")
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(_module_name(path))
    return {m for m in found if m.startswith("reasonguard")}


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    return {name: _imports(path, module_level_only) for name, path in MODULES.items()}


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_graph_reader_sees_the_imports() -> None:
    graph = _graph(module_level_only=False)
    assert "reasonguard.plan.memory" in graph["reasonguard.plan.decisions"]
    assert "reasonguard.plan.decisions" in graph["reasonguard.plan.estimate"]
    # A function-level import is not an import-time one.
    assert "reasonguard.plan.memory" not in _graph(True)["reasonguard.plan.decisions"]
    assert _cycle_through({"a": {"b"}, "b": {"a"}}, "a") == ["a", "b", "a"]


def test_no_import_circle_at_import_time_in_train() -> None:
    graph = _graph(module_level_only=True)
    for name in MODULES:
        if name.startswith("reasonguard.train"):
            assert _cycle_through(graph, name) is None, _cycle_through(graph, name)


@pytest.mark.parametrize("module", PLANNING)
def test_no_import_circle_through_the_planning_modules(module: str) -> None:
    assert module in MODULES
    cycle = _cycle_through(_graph(module_level_only=False), module)
    assert cycle is None, " -> ".join(cycle)


def test_decisions_takes_the_memory_model_not_the_plan() -> None:
    graph = _graph(module_level_only=False)
    assert "reasonguard.plan.estimate" not in graph["reasonguard.plan.decisions"]
    assert "reasonguard.plan.estimate" not in graph["reasonguard.plan.memory"]


def test_each_planning_module_imports_alone() -> None:
    for module in PLANNING:
        done = subprocess.run(
            [sys.executable, "-c", f"import {module}"], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
