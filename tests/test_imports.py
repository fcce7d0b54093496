"""The import rules, read from the source (AST), so that imports inside functions count too:

- data/, embed/, index/, eval/ (and serve/) never import ``uniret.train``;
- no import circle between uniret modules, module-level and function-level imports alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("data", "embed", "index", "eval", "serve")  # packages that must work without the trainer
NOT_PACKAGE = {"tests", "benchmarks", "docs"}


def module_files() -> dict[str, Path]:
    """Every module of the ``uniret`` package (the repository root) by dotted name."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_PACKAGE or any(p.startswith(".") for p in rel.parts):
            continue
        parts = ["uniret", *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): a block that never runs."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def runtime_nodes(tree: ast.AST, typing_only: bool) -> list[ast.AST]:
    """Every node of ``tree``; without ``typing_only``, less the bodies of ``if TYPE_CHECKING:``."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if not typing_only and is_type_checking(node):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return out


def imported_names(name: str, path: Path, source: str | None = None,
                   typing_only: bool = True) -> list[tuple[str, list[str], int]]:
    """``(base module, imported names, line)`` of every import statement in the module, at any depth
    (functions, methods, ``if`` blocks; ``if TYPE_CHECKING:`` blocks only with ``typing_only``), and
    of ``importlib.import_module("literal")`` calls. Relative imports are resolved against the
    module's package."""
    tree = ast.parse(source if source is not None else path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in runtime_nodes(tree, typing_only):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")):
            found.append((node.args[0].value, [], node.lineno))
    return found


def import_edges(name: str, path: Path, modules, source: str | None = None) -> set[str]:
    """The uniret modules that ``name`` imports when it runs (type-checking-only imports left out):
    ``from P import x`` counts as an import of the submodule ``P.x`` when there is one, else of ``P``."""
    edges = set()
    for base, names, _ in imported_names(name, path, source, typing_only=False):
        subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
        edges.update(subs)
        if base in modules and len(subs) < len(names) or (not names and base in modules):
            edges.add(base)
    edges.discard(name)
    return edges


def train_imports(name: str, path: Path, source: str | None = None) -> list[str]:
    """``file:line module`` for every import of ``uniret.train`` (or below) in the module."""
    hits = []
    for base, names, line in imported_names(name, path, source):
        targets = [base] + [f"{base}.{n}" for n in names]
        if any(t == "uniret.train" or t.startswith("uniret.train.") for t in targets):
            hits.append(f"{path.relative_to(ROOT)}:{line} imports {base} {names or ''}".strip())
    return hits


def test_library_never_imports_train():
    modules = module_files()
    checked = [n for n in modules if n.split(".")[1:2] and n.split(".")[1] in LIBRARY]
    assert len(checked) > 20  # the walk found the packages
    hits = [h for n in checked for h in train_imports(n, modules[n])]
    assert not hits, "the library imports the trainer:\n" + "\n".join(hits)


@pytest.mark.parametrize("source", [
    "def f():\n    from ..train.trainer import train\n",
    "def f():\n    if True:\n        from .. import train\n",
    "class A:\n    def m(self):\n        import uniret.train.config\n",
    "import importlib\nx = importlib.import_module('uniret.train')\n",
])
def test_train_guard_sees_nested_imports(source):
    path = ROOT / "eval" / "run.py"
    assert train_imports("uniret.eval.run", path, source)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {n: import_edges(n, p, modules) for n, p in modules.items()}


def test_cycle_finder_sees_function_level_circles():
    modules = {"uniret.a": ROOT / "a.py", "uniret.b": ROOT / "b.py", "uniret.c": ROOT / "c.py"}
    graph = {"uniret.a": import_edges("uniret.a", modules["uniret.a"], modules,
                                      "from typing import TYPE_CHECKING\nfrom .b import f\n"
                                      "if TYPE_CHECKING:\n    from .c import T\n"),
             "uniret.b": import_edges("uniret.b", modules["uniret.b"], modules, "def g():\n    from . import c\n"),
             "uniret.c": import_edges("uniret.c", modules["uniret.c"], modules, "def h():\n    import uniret.a\n")}
    assert cycles(graph) == [["uniret.a", "uniret.b", "uniret.c"]]
    assert graph["uniret.a"] == {"uniret.b"}  # an import for type checking only never runs
    graph["uniret.b"] = set()
    assert cycles(graph) == []


def test_no_import_circles():
    graph = import_graph()
    assert "uniret.eval.run" in graph["uniret.eval"]  # edges are resolved
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)
