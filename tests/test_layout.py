"""The package reads top-down: no import cycle, and the facade never asks which store it has."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "capgate"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``TYPE_CHECKING`` blocks aside)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip |= {id(n) for n in ast.walk(node)}
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1])
                    if node.module:
                        target = f"{target}.{node.module}"
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {c for c in candidates if c in modules and c != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> None:
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in stack:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    """The import graph of src/capgate, built with ast, is acyclic."""
    graph = import_graph()
    assert "capgate._engine.waiting" in graph  # the graph really covers the subpackage
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    """The check above can fail: a two-module loop is reported."""
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]


def test_the_facade_never_branches_on_the_store():
    """_gate.py names no store: it delegates to the engine make_engine chose."""
    source = (PACKAGE / "_gate.py").read_text(encoding="utf-8")
    for word in ("_fleet", "FleetStore", "MemoryStore", "isinstance(store", "store is None"):
        assert word not in source


def test_the_engine_imports_no_backend_client():
    """The waiting core and the in-memory store import neither redis nor a fleet module."""
    graph = import_graph()
    for module in ("capgate._engine.waiting", "capgate._engine.local", "capgate._gate"):
        assert "capgate._engine.fleet" not in graph[module]
        source = (PACKAGE / (module.split(".", 1)[1].replace(".", "/") + ".py")).read_text()
        assert "import redis" not in source
