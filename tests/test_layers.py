"""The import graph of sophon_ray/ and analysis/, read from the source: no cycles, and no import of a higher layer
from a lower one. Every import counts, the lazy ones inside functions included (they are real dependencies; only
``if TYPE_CHECKING:`` blocks are skipped).

Layers, lowest first (docs/design.md): base (errors, names, registry) < seam, recipes < spec < core < modes <
report (analysis/) < console (what the terminal shows) < run (the pipeline and its drivers) < cli (the commands).
A module may import its own layer and the ones below; a package's ``__init__`` counts as its layer.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["base", "recipes", "spec", "core", "modes", "report", "console", "run", "cli"]
BASE = {"sophon_ray", "sophon_ray.errors", "sophon_ray.names", "sophon_ray.registry"}


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module == "sophon_ray.seam":
        return "recipes"
    if module.startswith("analysis"):
        return "report"
    part = module.split(".")[1]
    if part not in LAYERS:
        raise AssertionError(f"{module}: not in a known layer; put it in one of sophon_ray/{{{','.join(LAYERS[1:])}}} "
                             "or add it to this test's layer table")
    return part


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from pkg import mod`` resolves to the module where there is one)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                child = f"{node.module}.{a.name}"
                found.add(child if child in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    paths = [*ROOT.joinpath("sophon_ray").rglob("*.py"), *ROOT.joinpath("analysis").rglob("*.py")]
    modules = {module_name(p): p for p in paths}
    return {name: imports(path, set(modules)) - {name} for name, path in modules.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := walk(node)):
            return found
    return None


def upward(edges: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in edges.items() for b in targets
                  if rank[layer(b)] > rank[layer(a)])


def test_the_import_graph_has_no_cycle():
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found)


def test_no_module_imports_a_higher_layer():
    bad = upward(graph())
    assert not bad, "imports that point up a layer (move the code down, or pass it in as an argument):\n" + "\n".join(bad)


def test_the_core_loops_and_the_seam_import_no_mode():
    edges = graph()
    lower = [m for m in edges if layer(m) in ("base", "recipes", "spec", "core")]
    assert not [f"{m} -> {t}" for m in lower for t in edges[m] if t.startswith("sophon_ray.modes")]


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    assert upward({"sophon_ray.core.attack": {"sophon_ray.run.plan"}}) == [
        "sophon_ray.core.attack (core) imports sophon_ray.run.plan (run)"]
    with pytest.raises(AssertionError, match="not in a known layer"):
        layer("sophon_ray.utils")
