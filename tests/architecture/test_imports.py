"""The package's imports point down: leaves never import stages, stages never import the
top (CLI, Python API, service), and no two modules import each other, even lazily.

Imports under ``if TYPE_CHECKING:`` are annotations only and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ferry"

#: Shared leaves: plain values and helpers every layer may use.
LEAVES = (
    "ferry.config",
    "ferry.routes",
    "ferry.envelope",
    "ferry.events",
    "ferry.message",
    "ferry.durations",
    "ferry.domains",
    "ferry.files",
    "ferry.resolver",
    "ferry.tls",
    "ferry.runtime",
    "ferry.metrics",
    "ferry.idempotency",
    "ferry.dkim",
)
#: The stages of a message's trip: intake → queue → delivery.
STAGES = ("ferry.intake", "ferry.queue", "ferry.delivery")
#: What sits on top and wires the stages together or speaks to people.
TOP = (
    "ferry.cli",
    "ferry.api",
    "ferry.service",
    "ferry.stats",
    "ferry.http",
    "ferry.dnscheck",
    "ferry.operations",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ferry"))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith("ferry")
        ):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {
        _module_name(p): _imports(ast.parse(p.read_text(), str(p)), modules) - {_module_name(p)}
        for p in paths
    }


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


GRAPH = _graph()


def test_the_graph_sees_the_package() -> None:
    assert "ferry.delivery.scheduler" in GRAPH
    assert "ferry.queue.base" in GRAPH["ferry.delivery.scheduler"]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _under(m, LEAVES)))
def test_leaves_import_no_stage_and_no_top(module: str) -> None:
    wrong = sorted(m for m in GRAPH[module] if _under(m, STAGES + TOP))
    assert not wrong, f"{module} is a shared leaf but imports {wrong}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _under(m, STAGES)))
def test_stages_never_import_the_top(module: str) -> None:
    wrong = sorted(m for m in GRAPH[module] if _under(m, TOP))
    assert not wrong, f"{module} is a stage but imports {wrong}"


def test_no_import_cycle() -> None:
    # Tarjan-free: a depth-first search that reports the first cycle it closes.
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(GRAPH.get(module, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := walk(dep)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := walk(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))
