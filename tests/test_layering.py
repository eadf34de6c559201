"""The import graph of graphopt's subpackages, built from the source (AST), has no cycle.

Nodes are graphopt's subpackages and top-level modules (``emit``, ``ort``, ``dist``, ``bench``,
``manager``, ...); an edge is any import of one from another, at module level or inside a
function. The package root (``graphopt/__init__.py``, the curated public API) is left out: it
imports everything on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "graphopt"


def _units(root: Path) -> set[str]:
    return {p.name if p.is_dir() else p.stem for p in root.iterdir()
            if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}


def _unit(module: str | None, units: set[str]) -> str | None:
    parts = (module or "").split(".")
    if parts[0] != "graphopt" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in units else None


def import_graph(root: Path = ROOT) -> nx.DiGraph:
    """Edges ``a -> b`` (subpackages/top-level modules), each with the first file:line that imports."""
    units = _units(root)
    g = nx.DiGraph()
    g.add_nodes_from(units)
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        src = _unit(".".join(parts), units)
        if src is None:
            continue
        package = parts if f.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                dst = _unit(t, units)
                if dst and dst != src and not g.has_edge(src, dst):
                    g.add_edge(src, dst, where=f"{rel}.py:{node.lineno}")
    return g


def test_the_graph_sees_real_imports():
    g = import_graph()
    assert {"emit", "ort", "dist", "bench", "cli", "analysis"} <= set(g.nodes)
    # a few edges that must exist (the graph is not empty by accident)
    assert g.has_edge("ort", "emit") and g.has_edge("dist", "emit") and g.has_edge("cli", "emit")


def test_no_cycle_between_subpackages():
    g = import_graph()
    cycles = list(nx.simple_cycles(g))
    described = [" -> ".join(f"{a} ({g.edges[a, b]['where']})" for a, b in zip(c, c[1:] + c[:1])) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(described[:10])


@pytest.mark.parametrize("low, high", [("emit", "ort"), ("emit", "dist"), ("emit", "bench"), ("emit", "cli"),
                                       ("bench", "ort"), ("bench", "dist")])
def test_lower_layers_do_not_import_higher_ones(low, high):
    g = import_graph()
    assert not nx.has_path(g, low, high), f"{low} reaches {high}: " + " -> ".join(nx.shortest_path(g, low, high))


def test_no_module_imports_a_private_helper_of_another_module():
    """``from graphopt.x import _helper`` across modules is how the emit <-> ort tangle started."""
    offenders = []
    for f in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("graphopt"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        offenders.append(f"{f.relative_to(ROOT.parent)}:{node.lineno} {node.module}.{a.name}")
    emit_side = [o for o in offenders if "/emit/" in o or "_emit.py" in o or "pipeline.py" in o]
    assert emit_side == []


def test_a_cycle_is_detected(tmp_path):
    """The check itself: two subpackages importing each other form a cycle."""
    pkg = tmp_path / "graphopt"
    for name, other in (("a", "b"), ("b", "a")):
        (pkg / name).mkdir(parents=True)
        (pkg / name / "__init__.py").write_text(f"def f():\n    from graphopt.{other} import x\n")
    (pkg / "__init__.py").write_text("")
    g = import_graph(pkg)
    assert list(nx.simple_cycles(g)) in ([["a", "b"]], [["b", "a"]])
