"""The import graph of src/distil_codegpt: circles between modules and imports that run up the layers.

    python benchmarks/import_graph.py            # every circle and upward import, then a count of each

Layers from the bottom (shared/DESIGN.md): settings and files -> data -> model -> distill -> compress -> engines ->
evaluate -> serve -> experiment -> cli. Every import counts, at the top of a module or inside a function, except
those of packages outside this project. Reads the source with `ast`: nothing is imported or run.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "distil_codegpt"
PACKAGE = "distil_codegpt"
LAYERS = ["", "data", "model", "distill", "compress", "engines", "evaluate", "serve", "experiment", "cli"]
TOP_LEVEL = {"pipeline": "experiment", "report_text": "cli", "cli": "cli"}  # other top-level modules: settings, files


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The project modules `path` imports (a `from pkg import mod` names the module where it is one)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(PACKAGE)}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: {i for i in imports(p) if i in files and i != m} for m, p in files.items()}


def layer(module: str) -> int:
    """The module's layer: its room under the package (top-level modules are settings and files, cli the top)."""
    parts = module.split(".")[1:]
    room = parts[0] if parts else ""
    return LAYERS.index(TOP_LEVEL.get(room, room)) if TOP_LEVEL.get(room, room) in LAYERS else 0


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in g.items() for b in targets if layer(b) > layer(a))


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def main() -> None:
    g = graph()
    found, up = circles(g), upward(g)
    for c in found:
        print(f"circle of {len(c)}: {' '.join(m.removeprefix(PACKAGE + '.') for m in c)}")
    for a, b in up:
        print(f"upward: {a.removeprefix(PACKAGE + '.')} -> {b.removeprefix(PACKAGE + '.')}")
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports: {len(found)} circles, {len(up)} upward imports")


if __name__ == "__main__":
    main()
