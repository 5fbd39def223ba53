"""The core's import graph, read from its source: no cycles, no hidden imports, no private names across modules.

A function-level import hides a dependency (and usually an import cycle) from the module's header; it is
allowed only for optional or heavy third-party packages (``LAZY_PACKAGES``). A name starting with one
underscore belongs to its module: importing it, or reaching it through another module or object, couples
two modules through something neither advertises.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

CORE = Path(__file__).resolve().parents[1] / "core" / "src"
#: Third-party packages the core may import inside a function: optional, or slow to import and used by few calls
#: (peft: only grafting.testing's oracle helpers, for the tests that compare with PEFT).
LAZY_PACKAGES = frozenset({"transformers", "huggingface_hub", "trl", "accelerate", "torch.distributed", "peft"})


@attrs.frozen
class Import:
    module: str  # the importing module
    target: str  # the imported module (a grafting module, or the external package's dotted name)
    names: tuple[str, ...]  # names taken from it (``from x import a, b``); empty for ``import x``
    line: int
    in_function: bool
    type_checking: bool


@attrs.frozen
class Graph:
    modules: dict[str, ast.Module]
    imports: list[Import]

    def edges(self) -> set[tuple[str, str]]:
        """Runtime import edges between the package's own modules."""
        return {(i.module, i.target) for i in self.imports if i.target in self.modules and not i.type_checking}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_package(root: Path, package: str = "grafting") -> Graph:
    modules = {
        module_name(root, path): ast.parse(path.read_text(), str(path))
        for path in sorted((root / package).rglob("*.py"))
    }
    imports = [imp for name, tree in modules.items() for imp in _imports(name, tree, modules)]
    return Graph(modules, imports)


def _imports(module: str, tree: ast.Module, modules: dict[str, ast.Module]) -> Iterator[Import]:
    def visit(node: ast.AST, in_function: bool, type_checking: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, (), child.lineno, in_function, type_checking)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = tuple(a.name for a in child.names)
                submodules = [f"{child.module}.{n}" for n in names if f"{child.module}.{n}" in modules]
                for target in submodules:  # ``from grafting import protocol``
                    yield Import(module, target, (), child.lineno, in_function, type_checking)
                rest = tuple(n for n in names if f"{child.module}.{n}" not in modules)
                if rest or not submodules:
                    yield Import(module, child.module, rest, child.lineno, in_function, type_checking)
            else:
                yield from visit(
                    child,
                    in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                    type_checking or _is_type_checking(child),
                )

    yield from visit(tree, False, False)


def _is_type_checking(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    edges: dict[str, set[str]] = {m: set() for m in graph.modules}
    for a, b in graph.edges():
        if a != b:
            edges[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def hidden_imports(graph: Graph) -> list[str]:
    """Function-level imports, except of the lazily imported third-party packages."""
    return [
        f"{i.module}:{i.line} imports {i.target}"
        for i in graph.imports
        if i.in_function and not any(i.target == p or i.target.startswith(p + ".") for p in LAZY_PACKAGES)
    ]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_crossings(graph: Graph) -> list[str]:
    """Private names imported from, or reached through, another of the package's modules."""
    found = [
        f"{i.module}:{i.line} imports {i.target}.{n}"
        for i in graph.imports
        if i.target in graph.modules
        for n in i.names
        if _private(n)
    ]
    defined: dict[str, set[str]] = {}  # private function and method names, by defining module
    for name, tree in graph.modules.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
                defined.setdefault(node.name, set()).add(name)
    for name, tree in graph.modules.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            owners = defined.get(node.attr, set())
            if owners and name not in owners and not _is_self(node.value):
                found.append(f"{name}:{node.lineno} uses {node.attr} of {sorted(owners)}")
    return found


def _is_self(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in {"self", "cls"}) or (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"
    )


def test_the_core_has_no_import_cycle() -> None:
    assert cycles(read_package(CORE)) == []


def test_the_core_imports_at_module_level() -> None:
    assert hidden_imports(read_package(CORE)) == []


def test_no_private_name_crosses_a_module() -> None:
    assert private_crossings(read_package(CORE)) == []


BAD_PACKAGE = {
    "bad/__init__.py": "",
    "bad/a.py": "from bad.b import helper\n",
    "bad/b.py": "def helper():\n    from bad import a\n    return a\n",
    "bad/c.py": "from bad.d import _secret\nimport bad.d\n\ndef f():\n    import transformers\n    return bad.d._hidden()\n",
    "bad/d.py": "_secret = 1\n\ndef _hidden():\n    return 2\n",
    "bad/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bad.f import F\n",
    "bad/f.py": "from bad.e import TYPE_CHECKING\n",
}


def test_the_checker_finds_each_kind_of_violation(tmp_path: Path) -> None:
    for name, text in BAD_PACKAGE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    graph = read_package(tmp_path, "bad")
    assert cycles(graph) == [["bad.a", "bad.b"]]  # e <-> f only under TYPE_CHECKING: not a runtime cycle
    assert hidden_imports(graph) == ["bad.b:2 imports bad.a"]  # the lazy transformers import is allowed
    assert private_crossings(graph) == ["bad.c:1 imports bad.d._secret", "bad.c:6 uses _hidden of ['bad.d']"]


@pytest.mark.parametrize("check", [cycles, hidden_imports, private_crossings])
def test_the_checker_passes_a_clean_package(tmp_path: Path, check: object) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "__init__.py").write_text("")
    (tmp_path / "good" / "a.py").write_text("def helper():\n    return 1\n")
    (tmp_path / "good" / "b.py").write_text(
        "from good.a import helper\n\nclass B:\n    def _own(self):\n        return self._own\n"
    )
    assert check(read_package(tmp_path, "good")) == []  # type: ignore[operator]
