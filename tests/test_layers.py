"""The library's layers (README "Layout"): every import of a qan_ray module, inside functions
too, goes to the same layer or one below, and no import cycle exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAYERS = {
    0: {"constants", "config", "schedules", "rewards", "records", "formats", "quiet",
        "scheduler_core", "signals"},
    1: {"features", "popoptim", "popconv", "lrfree", "tasks", "data", "models",
        "distribution", "class_sampling", "population", "trainer", "contract"},
    2: {"episode"},
    3: {"env", "vector_env", "control"},
    4: {"tune", "scheduler", "actors", "meta", "summaries", "plots", "protocol", "compare",
        "evaluate"},
    5: {"evaluate_flags", "smoke", "cli", "demo"},
}
LAYER = {m: k for k, mods in LAYERS.items() for m in mods}
PACKAGE = Path(__file__).resolve().parents[1] / "qan_ray"


def _imports(path: Path) -> set[str]:
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qan_ray"):
            deps |= ({a.name for a in node.names} if node.module == "qan_ray"
                     else {node.module.split(".")[1]})
        elif isinstance(node, ast.Import):
            deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qan_ray.")}
    return deps - {path.stem}


GRAPH = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def test_every_module_has_a_layer():
    assert set(GRAPH) == set(LAYER), "add the new module to README's Layout and LAYERS here"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    up = sorted(d for d in GRAPH[module] if LAYER[d] > LAYER[module])
    assert not up, f"{module} (layer {LAYER[module]}) imports {up} from a higher layer"


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(GRAPH[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(GRAPH):
        visit(m, [])
