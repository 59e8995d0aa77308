"""The package's import graph flows one way: cache and ops at the bottom, the runner above them,
the engine above the runner, the Hugging Face façade, eval and the CLI on top; and no module
imports itself back through a cycle. Every import counts, including lazy ones inside functions
and those under ``TYPE_CHECKING``: each is an arrow a reader has to follow."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import trellis

PACKAGE = Path(trellis.__file__).parent

# Lower layers never import higher ones. Equal ranks may not import each other either, except
# within one layer's own package.
LAYERS = {
    "trellis.utils": 0,
    "trellis.cache": 1,
    "trellis.ops": 1,
    "trellis.runner": 2,
    "trellis.engine": 3,
    "trellis.models": 4,
    "trellis.model_options": 5,
    "trellis.grid": 5,
    "trellis.eval": 6,
    "trellis.serve": 6,
    "trellis.cli": 7,
    "trellis.__main__": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str, modules: set[str]) -> str:
    """The module an import of ``name`` loads last: ``name`` itself, else its closest parent."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("trellis")}
            elif isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                if base.startswith("trellis"):
                    # `from trellis.x import y` loads trellis.x.y when y is a module, else trellis.x
                    targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                                for alias in node.names}
        graph[name] = {resolve(t, modules) for t in targets} - {name}
    return graph


def layer_of(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def test_every_module_belongs_to_a_layer():
    assert {m for m in import_graph() if m != "trellis" and layer_of(m) is None} == set()


def test_imports_only_point_down():
    upward = []
    for module, targets in import_graph().items():
        source = layer_of(module)
        if source is None:  # the root package re-exports the public names of every layer
            continue
        for target in targets:
            if target == "trellis":
                upward.append(f"{module} -> trellis (import the name from its own layer)")
                continue
            layer = layer_of(target)
            if layer != source and LAYERS[layer] >= LAYERS[source]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_nothing_below_the_facade_imports_it():
    importers = {m for m, targets in import_graph().items() if "trellis.models.llama" in targets}
    assert {m for m in importers if m != "trellis" and LAYERS[layer_of(m)] < LAYERS["trellis.models"]} == set()


def test_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
