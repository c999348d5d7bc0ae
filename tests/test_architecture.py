"""The package architecture: dependencies point from the paper packages toward the core, with no cycle.

Every ``import`` statement counts, including those deferred into functions (a deferred import only hides a
cycle); imports under ``if TYPE_CHECKING:`` never run and do not count. ``import factlens`` must stay light.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PAPER = ("bios", "recall", "capitals", "testbeds", "cli")
# What each paper package may import besides the core: core <- each paper package (bios: Zucchet et al.; recall,
# with capitals its Lv et al. entry point), testbeds <- both, cli <- all.
ALLOWED = {"bios": set(), "recall": set(), "capitals": {"recall"}, "testbeds": {"bios", "recall", "capitals"}}


def _modules(root: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in (root / "factlens").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """module -> the factlens modules it imports (``from pkg import sub`` resolves to the submodule)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import factlens.x.y` of an attribute path
                    target = target.rpartition(".")[0]
                if target.startswith("factlens") and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _group(module: str) -> str:
    """``core`` or the paper package a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PAPER else "core"


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_deferred_cycle(tmp_path):
    pkg = tmp_path / "factlens"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from factlens.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nimport factlens.a\n"
                                      "if TYPE_CHECKING:\n    from factlens import c\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph(tmp_path)
    assert graph["factlens.sub.b"] == {"factlens.a"}  # the TYPE_CHECKING import does not count
    assert graph["factlens.c"] == {"factlens.a"}  # relative import resolved
    assert _cycles(graph) == [["factlens.a", "factlens.sub.b"]]


def test_core_imports_no_paper_package():
    bad = {(m, t) for m, targets in import_graph().items() if _group(m) == "core" and m != "factlens"
           for t in targets if _group(t) != "core"}
    assert not bad, f"core modules importing paper packages: {sorted(bad)}"


def test_paper_packages_point_toward_the_core():
    edges = {(_group(m), _group(t)) for m, targets in import_graph().items() for t in targets}
    edges = {(a, b) for a, b in edges if a != b and b != "core"}
    mutual = {(a, b) for a, b in edges if (b, a) in edges}
    assert not mutual, f"packages importing each other: {sorted(mutual)}"
    disallowed = {(a, b) for a, b in edges if a != "cli" and b not in ALLOWED.get(a, set())}
    assert not disallowed, f"package dependencies outside the layering {ALLOWED}: {sorted(disallowed)}"


@pytest.mark.parametrize("heavy", ["pandas", "plotly", *(f"factlens.{p}" for p in PAPER)])
def test_import_factlens_is_light(heavy, _fresh_import_modules):
    assert not [m for m in _fresh_import_modules if m == heavy or m.startswith(heavy + ".")]


@pytest.fixture(scope="module")
def _fresh_import_modules() -> list[str]:
    code = "import json, sys, factlens; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lazy_names_still_work():
    code = ("import factlens; from factlens import recall; "
            "assert factlens.mitigate is __import__('factlens.recall.mitigation', fromlist=['x']).mitigate; "
            "assert recall.dataset_for is factlens.recall.dataset_for; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
