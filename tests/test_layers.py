"""The import layering of `src/memfit` (docs/architecture.md, "Layers"): imports point down, never in a circle.

Every `import` counts, module-level or inside a function. The technique registry names families as strings and
imports them lazily; that is the one sanctioned way up (a plug-in table), and it is not an import here.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

FAMILIES = {"activations", "adapters", "weights", "optim", "sampling", "zo", "kv"}
"""Where the techniques live: one package per place memory is spent."""
ALLOWED = {
    "errors": set(),
    "progress": set(),  # progress lines (logging); as foundational as errors
    "compat": {"errors"},
    "memory": {"errors", "compat"},
    "techniques": {"errors", "compat", "memory"},
    "models": {"errors", "compat"},
    "data": {"errors", "compat", "progress"},
    **{f: {"errors", "compat", "memory", "techniques", "models"} | FAMILIES for f in FAMILIES},
}
"""What each lower package may import (besides itself). Upper packages (recipe, train, plan, generate, report,
bench, cli, quickstart) may import anything below them; the package graph must stay acyclic."""

KNOWN_CYCLES: list[set[str]] = []
"""Cycles tolerated while being removed (none now)."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "memfit").rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("memfit")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("memfit"):  # `from pkg import mod` imports the module, else the package
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return found - {name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) & modules.keys() for name, path in modules.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "memfit"


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_lower_packages_import_only_what_lies_below_them():
    wrong = []
    for module, targets in _graph().items():
        allowed = ALLOWED.get(_package(module))
        if allowed is None:
            continue
        wrong += [f"{module} -> {t}" for t in sorted(targets) if _package(t) not in allowed | {_package(module)}]
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_module_imports_itself_in_a_circle():
    cycles = [c for c in _cycles(_graph()) if c not in KNOWN_CYCLES]
    assert not cycles, f"import cycles: {cycles}"


def test_packages_form_no_circle():
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        packages.setdefault(_package(module), set()).update(_package(t) for t in targets)
    for p, targets in packages.items():
        targets.discard(p)
    known = {frozenset(_package(m) for m in c) for c in KNOWN_CYCLES}
    cycles = [c for c in _cycles(packages) if frozenset(c) not in known]
    assert not cycles, f"package cycles: {cycles}"


def test_the_checker_sees_upward_imports_and_circles():
    graph = {"memfit.memory.x": {"memfit.weights.y"}, "memfit.weights.y": {"memfit.memory.x"}}
    assert _cycles(graph) == [{"memfit.memory.x", "memfit.weights.y"}]
    assert "weights" not in ALLOWED["memory"]
