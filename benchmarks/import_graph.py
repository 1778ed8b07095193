"""The import graph of src/distil_codegpt: circles between modules, imports that run up the layers, and project
imports inside functions.

    python benchmarks/import_graph.py            # every circle, upward and function-level import, then a count of each
    python benchmarks/import_graph.py SRC/PKG    # the same for another package directory

Layers from the bottom (shared/DESIGN.md): settings and files -> data -> model -> distill -> compress -> engines ->
evaluate -> serve -> experiment -> cli. Every import counts, at the top of a module, inside a function or under
`if TYPE_CHECKING:`, except those of packages outside this project. An import inside a function is for an optional
package, never to dodge a circle: the only project imports allowed there are cli.py's, which keep `--help` from
loading torch. Reads the source with `ast`: nothing is imported or run. tests/test_import_graph.py runs the checks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "distil_codegpt"
LAYERS = ["", "data", "model", "distill", "compress", "engines", "evaluate", "serve", "experiment", "cli"]
TOP_LEVEL = {"pipeline": "experiment", "report_text": "cli", "cli": "cli"}  # other top-level modules: settings, files
LAZY_ALLOWED = ("cli",)  # modules whose functions may import the project: each verb loads its stage when it runs


def module_name(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, package: bool, prefix: str) -> set[str]:
    """The project modules one import statement names (a `from pkg import mod` names the module where it is one)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name == prefix or a.name.startswith(prefix + ".")}
    base = node.module or ""
    if node.level:  # relative: from the module's own package, one level up per extra dot
        parts = module.split(".")[: len(module.split(".")) - (0 if package else 1)]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    if base != prefix and not base.startswith(prefix + "."):
        return set()
    return {base} | {f"{base}.{a.name}" for a in node.names}


def imports(path: Path, root: Path = SRC) -> set[str]:
    """The project modules `path` imports, wherever in the file."""
    module, prefix = module_name(path, root), root.name
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _imported(node, module, path.name == "__init__.py", prefix)
    return found


def function_imports(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, the statement) of each project import inside a function of `path`."""
    module, prefix = module_name(path, root), root.name
    tree = ast.parse(path.read_text(), str(path))
    found: set[tuple[int, str]] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    if _imported(node, module, path.name == "__init__.py", prefix):
                        found.add((node.lineno, ast.unparse(node)))
    return sorted(found)


def graph(root: Path = SRC) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {m: {i for i in imports(p, root) if i in files and i != m} for m, p in files.items()}


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


def lazy(root: Path = SRC) -> tuple[list[tuple[str, int, str]], int]:
    """(every project import inside a function outside `LAZY_ALLOWED`, as (module, line, statement); how many the
    allowed modules hold)."""
    allowed = {f"{root.name}.{m}" for m in LAZY_ALLOWED}
    found, kept = [], 0
    for p in sorted(root.rglob("*.py")):
        module = module_name(p, root)
        hits = function_imports(p, root)
        if module in allowed:
            kept += len(hits)
        else:
            found += [(module, line, statement) for line, statement in hits]
    return found, kept


def main(root: Path = SRC) -> None:
    g = graph(root)
    found, up = circles(g), upward(g)
    inside, kept = lazy(root)

    def short(m: str) -> str:
        return m.removeprefix(root.name + ".")

    for c in found:
        print(f"circle of {len(c)}: {' '.join(short(m) for m in c)}")
    for a, b in up:
        print(f"upward: {short(a)} -> {short(b)}")
    for m, line, statement in inside:
        print(f"in a function: {short(m)}:{line}: {statement}")
    print(
        f"{len(g)} modules, {sum(map(len, g.values()))} imports: {len(found)} circles, {len(up)} upward imports, "
        f"{len(inside)} function-level project imports ({kept} more in {', '.join(LAZY_ALLOWED)}, allowed)"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else SRC)
