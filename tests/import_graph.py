"""Who imports whom inside a package, read from the source (no module is imported).

Every import statement counts, wherever it stands: at the top, inside a function, or in
an ``if TYPE_CHECKING:`` block, since a name used only in a type hint still ties the two
modules together. ``import a.b``, ``from . import b``, ``from .a import b`` and
``from ..a.b import c`` are all read; an imported name that is a module of its own
(``from .core import telemetry``) counts as an import of that module, any other name as
an import of the module (or package ``__init__``) it comes from. Imports of modules
outside the package are left out.

    graph = ImportGraph.of_package(Path("celery_warmpool"))
    graph.circles(within="celery_warmpool.core")        # [] when there is none
    graph.imports_outside("celery_warmpool.core")       # edges that leave the layer
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ImportGraph"]


@dataclass(repr=False)
class ImportGraph:
    """Modules of one package (dotted names; a package is named by its ``__init__``) and,
    for each, the modules of the package it imports, with the line of each import."""

    modules: set[str]
    edges: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of_package(cls, root: Path) -> ImportGraph:
        """Read every ``.py`` file under ``root``, a package directory."""
        files = {_module_name(root, path): path for path in sorted(root.rglob("*.py"))}
        graph = cls(set(files))
        for module, path in files.items():
            tree = ast.parse(path.read_text(), filename=str(path))
            is_package = path.name == "__init__.py"
            graph.edges[module] = {}
            for target, line in _imports(tree, module, is_package):
                resolved = graph._resolve(target)
                if resolved is not None and resolved != module:
                    graph.edges[module].setdefault(resolved, line)
        return graph

    def imports_of(self, module: str) -> set[str]:
        """The modules of the package ``module`` imports."""
        return set(self.edges.get(module, {}))

    def circles(self, within: str | None = None) -> list[list[str]]:
        """Groups of modules that import each other, directly or round a loop.

        ``within`` (a package's dotted name) keeps only its modules and the imports
        among them. Each group is sorted; groups are sorted by their first module.
        """
        nodes = sorted(m for m in self.modules if within is None or _inside(m, within))
        kept = set(nodes)
        successors = {m: sorted(t for t in self.edges.get(m, {}) if t in kept) for m in nodes}
        return sorted((sorted(group) for group in _strongly_connected(nodes, successors)
                       if len(group) > 1), key=lambda group: group[0])

    def imports_outside(self, layer: str, *, allowed: Iterable[str] = ()) -> list[str]:
        """``importer -> imported (line N)`` for each import by a module of ``layer`` of a
        module of the package outside it (and outside ``allowed``, dotted prefixes)."""
        allowed = tuple(allowed)
        found = []
        for module in sorted(m for m in self.modules if _inside(m, layer)):
            for target, line in sorted(self.edges.get(module, {}).items()):
                if _inside(target, layer) or any(_inside(target, a) for a in allowed):
                    continue
                found.append(f"{module} -> {target} (line {line})")
        return found

    def _resolve(self, dotted: str) -> str | None:
        """The package module ``dotted`` names, or the nearest enclosing one."""
        parts = dotted.split(".")
        while parts:
            name = ".".join(parts)
            if name in self.modules:
                return name
            parts.pop()
        return None


def _module_name(root: Path, path: Path) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """Every dotted name ``tree`` imports (a module, or a module's attribute), with its line."""
    for node in ast.walk(tree):  # walks function bodies and if-blocks alike
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, is_package)
            for alias in node.names:
                # ``from x import y``: y may be a module of x's or a name x defines;
                # resolving ``x.y`` finds the module if there is one, else x itself.
                yield (base if alias.name == "*" else f"{base}.{alias.name}"), node.lineno


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    # A module's ``.`` is its package; a package's ``.`` is itself.
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def _strongly_connected(nodes: list[str], successors: dict[str, list[str]]
                        ) -> list[list[str]]:
    """Tarjan's algorithm, without recursion (the graph may be deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(successors[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(successors[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                groups.append(group)
    return groups
