"""The package's structure, checked from its source: import arrows run one way, modules stay
small, and the runtime never imports the benchmark.

Edges are every ``import`` of an anychip module, at module level or inside a function (an
import hidden in a function to dodge a cycle is still a cycle). ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module, else to ``pkg``; importing a submodule adds no edge
to its parent package's ``__init__``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "anychip"
MAX_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _package_of(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _edges(module: str, path: pathlib.Path) -> set[str]:
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            edges.update(a.name for a in node.names if a.name.split(".")[0] == "anychip")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module, path).split(".")
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            if base.split(".")[0] != "anychip":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                edges.add(sub if sub in MODULES else base)
    edges.discard(module)
    return {e for e in edges if e in MODULES}


GRAPH = {m: _edges(m, p) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_edge_rules_see_a_cycle():
    # The checker itself: a two-module loop and a loop through a package root are found.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"p": {"p.x"}, "p.x": {"p"}}) == [["p", "p.x"]]
    assert _cycles({"p": {"p.x"}, "p.x": set()}) == []


def test_no_import_circles():
    cycles = _cycles(GRAPH)
    detail = "; ".join(
        " / ".join(f"{m} -> {sorted(GRAPH[m] & set(c))}" for m in c) for c in cycles
    )
    assert not cycles, f"import circles: {detail}"


def test_no_module_over_the_size_limit():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


@pytest.mark.parametrize("prefix", ["anychip.backends", "anychip.step", "anychip.kernels", "anychip.engine"])
def test_runtime_does_not_import_the_bench(prefix):
    offenders = {
        m: sorted(e for e in edges if e == "anychip.bench" or e.startswith("anychip.bench."))
        for m, edges in GRAPH.items()
        if m == prefix or m.startswith(prefix + ".")
    }
    offenders = {m: e for m, e in offenders.items() if e}
    assert not offenders, f"runtime modules importing the benchmark: {offenders}"


def test_engine_leaf_imports_no_anychip_module():
    # engine.py and errors.py are the shared leaves every layer may import.
    for leaf in ("anychip.engine", "anychip.errors"):
        assert GRAPH[leaf] <= {"anychip.errors"}, f"{leaf} imports {sorted(GRAPH[leaf])}"
