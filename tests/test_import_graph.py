"""No import cycles among the project's modules.

The graph is static: every ``import`` / ``from ... import`` statement anywhere in a module
(top level, inside functions, under ``if TYPE_CHECKING:``) is an edge to the project module
it names. ``from package import name`` is an edge to ``package.name`` when that is a module,
else to ``package``. A cycle means a piece both sides need lives in the wrong module: move
it down into a module both import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# the same code on Linux and macOS: CI's macOS pass leaves it out (tests/test_portable.py)
pytestmark = pytest.mark.portable

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mlx_redrafter", "convert")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of ``packages`` under ``root``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name ``from <node.module>`` refers to, inside ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` or its longest prefix that is a project module (``None``: not the project's)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: project modules it imports}`` (self-imports dropped)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                found = _project_module(target, modules)
                if found is not None and found != module:
                    edges[module].add(found)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component of more than one module
    (Tarjan's algorithm; iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(_cycle_in(component, edges) for component in components)


def _cycle_in(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected ``component``."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"not strongly connected: {component}")


def test_no_import_cycles() -> None:
    modules = module_files(REPO, PACKAGES)
    assert len(modules) > 50 and "mlx_redrafter.engine" in modules and "convert.gguf" in modules
    cycles = find_cycles(import_edges(modules))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    "closing",
    [
        "from pkg.sub.a import thing\n",
        "from .a import thing\n",
        "from ..sub import a\n",
        "from . import a\n",
        "import pkg.sub.a as a\n",
        "def f():\n    from pkg.sub import a\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.a import T\n",
    ],
)
def test_a_planted_cycle_is_found_and_named(tmp_path: Path, closing: str) -> None:
    """Each import form in ``c`` closes the cycle ``a -> b -> c -> a`` and the check names it;
    without that import the same package has none (so the check above can fail)."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "",
            "pkg/sub/a.py": "import os\nimport pkg.sub.b\n",
            "pkg/sub/b.py": "from pkg.sub.c import x\nfrom pkg import sub\n",
            "pkg/sub/c.py": "x = 1\n",
            "pkg/sub/d.py": "from pkg.sub.a import y\n",
        },
    )
    modules = module_files(tmp_path, ("pkg",))
    assert find_cycles(import_edges(modules)) == []
    (tmp_path / "pkg/sub/c.py").write_text(closing + "x = 1\n")
    assert find_cycles(import_edges(modules)) == [
        ["pkg.sub.a", "pkg.sub.b", "pkg.sub.c", "pkg.sub.a"]
    ]
