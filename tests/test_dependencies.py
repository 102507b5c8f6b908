"""Dependencies point down (DESIGN.md, "Conventions"): no import cycle, late imports included, and the layers.

The graph is read from the source with ast, so a function-level import counts as much as a top-level one; only
imports under `if TYPE_CHECKING:` are left out (they never run).
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("steering_app", "presets_app", "steerproject")
# The plain-constant modules the engine may read: they import nothing from Django (checked below).
ENGINE_MAY_IMPORT = {"steering_app.limits", "steering_app.json_checks", "steering_app.model_files"}
# The domain: what entry layers call, and what calls the engine (DESIGN.md, "Conventions").
DOMAIN = {
    "steering_app.runs",
    "steering_app.services",
    "steering_app.analysis",
    "steering_app.experiments",
    "steering_app.experiment_results",
}
ENTRY = {"steering_app.worker", "steering_app.views", "steering_app.api", "steering_app.consumers"}


def module_files() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every dotted name the module imports, at any depth, except under `if TYPE_CHECKING:`."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            # `from package import submodule` imports the submodule: record both, resolved below.
            names.update(f"{source}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for name in imported_names(tree, module, path.name == "__init__.py"):
            if name in files or not name.startswith(PACKAGES):
                edges.add(name)
            # Else `from module import attribute`: the module itself is recorded as a name of its own.
        edges.discard(module)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def internal(graph: dict[str, set[str]], module: str) -> set[str]:
    return {name for name in graph[module] if name.startswith(PACKAGES)}


def top(name: str) -> str:
    return name.partition(".")[0]


def test_it_finds_late_imports_and_skips_type_checking_blocks():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from .engine import loader\n"
        "if TYPE_CHECKING:\n"
        "    from steering_app import hidden\n"
        "def late():\n"
        "    import steering_app.runs\n"
        "    from ..other import thing\n"
    )
    names = imported_names(ast.parse(source), "steering_app.sub.module", is_package=False)
    assert "steering_app.sub.sibling" in names
    assert "steering_app.sub.engine.loader" in names
    assert "steering_app.runs" in names
    assert "steering_app.other.thing" in names
    assert "steering_app.hidden" not in names


def test_it_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_it_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(component) for component in found)


def test_it_keeps_the_engine_free_of_django_and_the_app():
    graph = import_graph()
    wrong = {}
    for module in graph:
        if not module.startswith("steering_app.engine"):
            continue
        bad = {
            name
            for name in graph[module]
            if top(name) in {"django", "channels", "ninja", "steerproject", "presets_app"}
            or (
                name.startswith("steering_app.")
                and not name.startswith("steering_app.engine")
                and name not in ENGINE_MAY_IMPORT
            )
        }
        if bad:
            wrong[module] = sorted(bad)
    assert not wrong, f"the engine imports outside itself: {wrong}"


def test_it_keeps_the_engines_constant_modules_plain():
    graph = import_graph()
    for module in ENGINE_MAY_IMPORT:
        assert not {top(name) for name in graph[module]} & {"django", "channels", "ninja", "torch"}, module
        assert not internal(graph, module), module


def test_it_keeps_runs_and_services_below_the_entry_layers():
    graph = import_graph()
    wrong = {module: sorted(graph[module] & ENTRY) for module in DOMAIN if graph[module] & ENTRY}
    assert not wrong, f"the domain imports an entry layer: {wrong}"


def imported_heavy_modules(statements: str) -> str:
    """What of torch and the engine a fresh Django process has imported after running statements."""
    code = (
        f"import sys, django; django.setup(); {statements}; "
        "print(sorted(name for name in sys.modules if name in ('torch', 'steering_app.engine')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "steerproject.settings"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(
    "module",
    ["steering_app.forms", "steering_app.steering_settings", "steering_app.panel", "steering_app.views"],
)
def test_it_imports_forms_and_settings_without_torch(module):
    assert imported_heavy_modules(f"import {module}") == "[]"


def test_the_panel_reads_a_models_chat_template_without_the_engine():
    """Every panel render asks whether the model has a chat template: from its files, never by importing the
    engine, which in the embedded deployment waited on the worker's own import of torch while it loaded the model
    (the first panel after a start took 8 s)."""
    assert (
        imported_heavy_modules(
            "from steering_app import panel; assert panel.has_chat_template('smollm2-demo')"
        )
        == "[]"
    )
