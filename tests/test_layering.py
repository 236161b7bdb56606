"""The dependency rules of docs/design.md, checked on the source (imports at any depth: lazy ones count too).

- data/ and models/ import nothing of ours; the scorer's core (scoring/ less scoring/entry/) imports nothing of ours
  but itself: it is the judge.
- compress/ implements the scorer's protocol: it imports the core, never the organizers' tools.
- The organizers' tools (scoring/entry/) compose data/, models/, compress/ and conf/, never train/.
- Nothing imports the entry script train/run.py; of the search package, the run imports only its allocate stage.
- No import cycle between the project's modules; no function over 60 lines, no class over 300 (tests aside).
"""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "data", "models", "compress", "scoring", "conf")
#: The one module of the search package that the run imports.
ALLOCATE_STAGE = "train.search.stage"
FUNCTION_LINES, CLASS_LINES = 60, 300


@cache
def _modules() -> dict[str, Path]:
    """Every module of our packages by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


@cache
def _imports() -> dict[str, frozenset[str]]:
    """The modules of ours that each module imports: ``from a.b import c`` counts ``a.b`` and ``a.b.c`` where they
    are modules, relative imports resolved."""
    known = _modules()
    graph = {}
    for name, path in known.items():
        parts, found = name.split("."), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                keep = len(parts) - node.level + (path.name == "__init__.py") if node.level else 0
                base = ".".join(parts[:keep] + [node.module] if node.module else parts[:keep])
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = frozenset(module for module in found if module in known and module != name)
    return graph


#: The scoring package's command modules (``python -m scoring``, ``python -m scoring.export``): they run the
#: organizers' tools, so they are not the judge's core.
SCORING_COMMANDS = ("scoring.__main__", "scoring.export")


def _area(module: str) -> str:
    """The layer a module belongs to: scoring/entry/, the scoring commands and train/search/ are layers of their
    own."""
    if module in SCORING_COMMANDS:
        return "scoring commands"
    for area in ("scoring.entry", "train.search"):
        if module == area or module.startswith(area + "."):
            return area
    return module.split(".")[0]


#: The layers each layer may import (its own always).
ALLOWED = {
    "data": set(),
    "models": set(),
    "conf": set(),
    "scoring": set(),
    "compress": {"scoring"},
    "scoring.entry": {"scoring", "data", "models", "compress", "conf"},
    "scoring commands": {"scoring", "scoring.entry"},
}


@pytest.mark.parametrize("area", sorted(ALLOWED))
def test_dependencies_point_one_way(area):
    offending = {module: sorted({_area(m) for m in imported} - ALLOWED[area] - {area})
                 for module, imported in _imports().items() if _area(module) == area}
    assert {module: areas for module, areas in offending.items() if areas} == {}


def test_nothing_imports_the_entry_script():
    assert [module for module, imported in _imports().items() if "train.run" in imported] == []


def test_the_run_imports_only_the_allocate_stage_of_the_search_package():
    outside = {module: sorted(m for m in imported if _area(m) == "train.search")
               for module, imported in _imports().items() if _area(module) != "train.search"}
    assert {module: found for module, found in outside.items() if found and found != [ALLOCATE_STAGE]} == {}
    assert ALLOCATE_STAGE in _modules()


def _cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), less a package and the children it
    re-exports (each name a prefix of the others: importing a package runs its __init__, no cycle of concepts)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            nested = all(a.startswith(b) or b.startswith(a) for a in component for b in component)
            if len(component) > 1 and not nested:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    assert _cycles(_imports()) == []


def test_the_cycle_check_finds_a_cycle():
    graph = {"a.x": frozenset({"a.y"}), "a.y": frozenset({"a.x"}), "a": frozenset({"a.x"})}
    assert _cycles(graph) == [["a.x", "a.y"]]


def test_the_check_sees_lazy_imports():
    assert "data.datasets" in _imports()["scoring.entry.boundary"]  # a module-level import
    assert "data.tasks" in _imports()["scoring.entry.bundle"]  # imported inside model_spec only
    assert "models" in _imports()["scoring.entry.bundle"]  # likewise, inside build_model_from_entry


def _long_definitions() -> list[str]:
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            limit = CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} is {lines} lines")
    return found


def test_no_function_over_60_lines_and_no_class_over_300():
    assert _long_definitions() == []
