"""The house's rules, checked on the source: imports run down docs/DEVELOPING.md's table and never back up.

Every import counts, the lazy ones inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "vggspec"

# Rooms from the bottom up; a room may import its own modules and any room below it.
ROOMS = [
    ("leaf", ["version", "error_root", "errors", "files", "atomic", "preprocessing", "resources", "labels", "spec",
              "display", "limits"]),
    ("graph", ["graph", "summary", "draw"]),
    ("contract", ["contract", "imaging"]),
    ("datasets", ["datasets"]),
    ("weights", ["weights"]),
    ("backends", ["backends", "checkpoints"]),
    ("runtime", ["runtime"]),
    ("serve", ["serve"]),
    ("train", ["train"]),
    ("cli", ["cli", "__main__"]),
    ("facade", ["__init__"]),
]
# The runtime and the server run on an edge box: they know ONNX files and their metadata, never the compiler
# or torch (a checkpoint's exporter is passed in from the CLI).
RUNTIME_MAY_NOT = {"graph", "weights", "backends", "checkpoints", "train", "summary", "draw", "spec"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def _imports(path: Path) -> set[str]:
    """vggspec modules imported by `path`, as dotted names relative to the package."""
    module = _module(path).split(".")
    package = module if path.name == "__init__.py" else module[:-1]
    package = [] if package == ["__init__"] else package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found |= {f"{target}.{a.name}" if not node.module else target for a in node.names}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {n.removeprefix("vggspec.") for n in names if n == "vggspec" or n.startswith("vggspec.")}
    return {f.strip(".") or "__init__" for f in found}


def _room(module: str) -> int:
    top = module.split(".")[0] if module else "__init__"
    for rank, (_, tops) in enumerate(ROOMS):
        if top in tops:
            return rank
    raise AssertionError(f"module {module} is in no room of the table")


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    for path in PACKAGE.rglob("*.py"):
        src = _module(path)
        for dst in _imports(path):
            g.add_edge(src, dst if dst in _known() else dst.rsplit(".", 1)[0])
    return g


def _known() -> set[str]:
    return {_module(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_circles() -> None:
    g = _graph()
    g.remove_edges_from(nx.selfloop_edges(g))
    assert list(nx.simple_cycles(g)) == []


def test_imports_run_down_the_table() -> None:
    upward = sorted((a, b) for a, b in _graph().edges if a and _room(b) > _room(a))
    assert upward == []


def test_the_runtime_never_reaches_the_compiler() -> None:
    bad = sorted((a, b) for a, b in _graph().edges
                 if a.split(".")[0] in ("runtime", "serve") and b.split(".")[0] in RUNTIME_MAY_NOT)
    assert bad == []


def test_nothing_inside_imports_the_facade() -> None:
    assert sorted(a for a, b in _graph().edges if b == "__init__" and a != "__main__") == []
