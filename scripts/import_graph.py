#!/usr/bin/env python
"""Print the import cycles among rlsys's modules, function-level imports included.

Reads every ``rlsys/**/*.py`` with :mod:`ast` (nothing is imported) and collects each ``import`` /
``from ... import`` wherever it appears: module level, inside functions, inside ``try``. Imports under
``if TYPE_CHECKING:`` are left out (they never run). ``from rlsys.a import b`` is an edge to
``rlsys.a.b`` when that is a module, else to ``rlsys.a``. A cycle is a strongly connected component of
more than one module; each is printed with one concrete path around it.

Usage::

    python scripts/import_graph.py            # exit 1 if there is a cycle
    python scripts/import_graph.py --edges    # also print every edge, "a -> b (line)"
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "rlsys"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, name: str, modules: set[str]) -> list[tuple[str, int]]:
    """(imported rlsys module, line) for every import statement in ``path`` that runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, int]] = []

    def resolve(base: str) -> str:
        # The longest prefix of base that is a module of ours.
        while base and base not in modules:
            base = base.rpartition(".")[0]
        return base

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    out.append((resolve(alias.name), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{node.module}" if node.module else pkg
            else:
                base = node.module or ""
            if base == PACKAGE or base.startswith(PACKAGE + "."):
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    out.append((target if target in modules else resolve(base), node.lineno))
        for sub in ast.iter_child_nodes(node):
            visit(sub)

    visit(tree)
    return [(m, line) for m, line in out if m and m != name]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                comps.append(sorted(comp))
    return comps


def cycle_path(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest closed path through the component's first module: [start, ..., start]."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    following.append(w)
        frontier = following
    return [*comp, start]


def build_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int]]:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    lines: dict[tuple[str, str], int] = {}
    for p in files:
        name = module_name(p)
        for target, line in imports_of(p, name, modules):
            graph[name].add(target)
            lines.setdefault((name, target), line)
    return graph, lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--edges", action="store_true", help="print every edge too")
    args = ap.parse_args()
    graph, lines = build_graph()
    if args.edges:
        for a in sorted(graph):
            for b in sorted(graph[a]):
                print(f"{a} -> {b} (line {lines[(a, b)]})")
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    for comp in sorted(cycles):
        path = cycle_path(graph, comp)
        hops = " -> ".join(f"{a} (l.{lines[(a, b)]})" for a, b in zip(path, path[1:])) + f" -> {path[-1]}"
        print(f"cycle of {len(comp)} modules: {', '.join(comp)}\n  e.g. {hops}")
    if not cycles:
        print(f"no import cycles among {len(graph)} modules ({sum(map(len, graph.values()))} edges)")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
