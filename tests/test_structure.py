"""The library's shape: no import cycle inside chatkit/, and conversion apart from training."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "chatkit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the chatkit modules it imports anywhere in its file (lazy imports in functions too)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from chatkit.train import checkpoint` imports the submodule chatkit.train.checkpoint
                targets = [
                    f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules
                ]
                targets = targets or [node.module]
            graph[mod] |= {t for t in targets if t in modules and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_inside_chatkit():
    graph = import_graph()
    assert "chatkit.train.zero" in graph and graph["chatkit.train.zero"]  # the graph was read
    assert cycles(graph) == []


def test_conversion_imports_no_training_code():
    """Every conversion module, imported for real, loads neither chatkit.train nor DeepSpeed."""
    convert = sorted(_module_name(p) for p in (PKG / "convert").glob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for m in {convert!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('chatkit.train', 'deepspeed'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert len(convert) >= 8
    assert out.stdout.strip() == "[]"


def test_conversion_modules_import_nothing_from_train_even_lazily():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("chatkit.convert"):
            assert not [d for d in deps if d.startswith("chatkit.train")], mod
