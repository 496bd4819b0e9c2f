"""The shape of emotrain's code, read from its source with `ast` (nothing is imported): no function
over 120 lines, no two modules importing each other, and imports running one way,
config -> data and model -> train -> predict / cv / report -> cli.

Every import statement counts wherever it is (module level, inside a function, under
TYPE_CHECKING), relative or absolute; `from emotrain.x import y` is an import of the module
`emotrain.x.y` when there is one, else of `emotrain.x`."""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "emotrain"
MAX_FUNCTION_LINES = 120

LOWER_LAYERS_MUST_NOT_IMPORT = {
    ("emotrain.config", "emotrain.data", "emotrain.model"): (
        "emotrain.train", "emotrain.predict", "emotrain.cv", "emotrain.report", "emotrain.cli", "emotrain.plots",
        "emotrain.hub"),
    ("emotrain.train",): ("emotrain.predict", "emotrain.cv", "emotrain.report", "emotrain.cli", "emotrain.hub"),
}
"""Modules under a prefix on the left may import nothing under a prefix on the right."""


@dataclass(frozen=True)
class Module:
    name: str
    """Dotted: `emotrain.data.prepare`; a package is its `__init__.py` (`emotrain.data`)."""
    path: Path
    tree: ast.Module

    @property
    def where(self) -> str:
        return str(self.path.relative_to(PACKAGE.parent))

    @property
    def package(self) -> str:
        """What a relative import starts from: the module itself for an `__init__.py`, else its parent."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


@functools.cache
def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = Module(name, path, ast.parse(path.read_text(), filename=str(path)))
    return found


def _imported(module: Module, node: ast.Import | ast.ImportFrom, known: dict[str, Module]) -> set[str]:
    """The emotrain modules one import statement imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    return {name for name in names if name in known}


@functools.cache
def imports() -> dict[str, dict[str, int]]:
    """{module: {emotrain module it imports: the line of the first such import}}."""
    known = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, module in known.items():
        edges: dict[str, int] = {}
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(module, node, known) - {name}:
                    edges[target] = min(edges.get(target, node.lineno), node.lineno)
        graph[name] = edges
    return graph


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_the_package_is_read():
    found = modules()
    assert {"emotrain.cli", "emotrain.config", "emotrain.data.prepare", "emotrain.model.emotion_model"} <= set(found)
    assert imports()["emotrain.data.prepare"].get("emotrain.config"), "the import graph misses a plain import"


def test_no_function_is_over_120_lines():
    too_long = []
    for module in modules().values():
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{module.where}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(too_long)


def test_no_two_modules_import_each_other():
    graph = imports()
    cycles = [f"{a} (line {graph[a][b]}) <-> {b} (line {graph[b][a]})"
              for a in sorted(graph) for b in sorted(graph[a]) if a < b and a in graph.get(b, {})]
    assert not cycles, "modules importing each other: " + "; ".join(cycles)


def test_imports_run_from_config_data_model_to_train_to_predict_cv_report_to_cli():
    graph = imports()
    upward = []
    for lower, forbidden in LOWER_LAYERS_MUST_NOT_IMPORT.items():
        for name in sorted(graph):
            if _under(name, lower):
                upward += [f"{modules()[name].where}:{line} imports {target}"
                           for target, line in sorted(graph[name].items()) if _under(target, forbidden)]
    assert not upward, "imports against the layering: " + "; ".join(upward)
