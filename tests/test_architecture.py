"""The package's shape: no import cycles, the public API, py.typed, lint-clean code."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import wsicodec

PACKAGE = Path(wsicodec.__file__).resolve().parent
REPO = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every wsicodec module -> the wsicodec modules it imports, at top level or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cyc := visit(m)):
                return cyc
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cyc := visit(n)):
            return cyc
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "wsicodec.models.registry" in graph
    # the package's own __init__ re-exports the API; importing it from below is the one allowed way up
    for deps in graph.values():
        deps.discard("wsicodec")
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_does_not_import_the_tools():
    """source, models, quant, format, pipeline and reader never reach into stats/, research/ or the CLI."""
    graph = import_graph()
    core = [m for m in graph if m.split(".")[1:2] and m.split(".")[1] in
            {"source", "models", "quant", "format", "pipeline", "reader", "quality", "_io", "_progress"}]
    for m in core:
        bad = {d for d in graph[m] if d.split(".")[1] in {"stats", "research", "cli", "testing"}}
        assert not bad, f"{m} imports {sorted(bad)}"


def test_public_api():
    for name in ("compress", "restore", "open", "Container", "load_model", "Autoencoder", "WsicodecError",
                 "SlideError", "ModelError", "ContainerError", "OutputExistsError", "CompressResult",
                 "RestoreResult", "restore_region", "__version__"):
        assert hasattr(wsicodec, name), name
        assert name in wsicodec.__all__
    import dataclasses

    for cls in (wsicodec.CompressResult, wsicodec.RestoreResult):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def test_py_typed_ships():
    assert (PACKAGE / "py.typed").is_file()
    text = (REPO / "pyproject.toml").read_text()
    assert "py.typed" in text


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None and shutil.which("ruff") is None,
                    reason="ruff is not installed (pip install -e '.[test]' brings it)")
def test_ruff_is_clean():
    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", "wsicodec", "tests", "benchmarks", "examples"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
