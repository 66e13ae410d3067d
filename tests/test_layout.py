"""The package's shape stays what ARCHITECTURE.md §2 says: stages as packages, no import
cycle (imports inside functions included), and the pygeoapi internals the job managers
override still called the way they are overridden."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from pygeoapi.process.manager.base import BaseManager

from kappamask.jobs import managers

SERVICE = Path(__file__).resolve().parents[1] / "service"
PACKAGE = SERVICE / "kappamask"


def _module(path: Path) -> str:
    parts = path.relative_to(SERVICE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports, anywhere in its body."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kappamask"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else str(node.module))
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("kappamask."))
        graph[name] = {m for m in found if m in modules and m not in (name, "kappamask")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            if group:
                found.append(sorted([node, *group]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_round_a_circle() -> None:
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_stages_are_packages() -> None:
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(top) <= 12, top
    for stage in (
        "sources",
        "reading",
        "geometry",
        "inference",
        "model",
        "assembly",
        "writers",
        "storage",
        "api",
        "jobs",
        "tools",
    ):
        assert (PACKAGE / stage / "__init__.py").exists(), stage


def test_the_overridden_pygeoapi_internals_keep_their_parameters() -> None:
    # kappamask.jobs.managers overrides these private methods of pygeoapi's BaseManager
    # (pyproject pins pygeoapi below the next minor version: checked on 0.21 and 0.24)
    handler = [
        "self",
        "p",
        "job_id",
        "data_dict",
        "requested_outputs",
        "subscriber",
        "requested_response",
    ]
    expected = {
        "_execute_handler_async": handler,
        "_execute_handler_sync": handler,
        "_send_in_progress_notification": ["self", "subscriber"],
        "_send_success_notification": ["self", "subscriber", "outputs"],
        "_send_failed_notification": ["self", "subscriber"],
    }
    for name, parameters in expected.items():
        assert list(inspect.signature(getattr(BaseManager, name)).parameters) == parameters, name
        assert name in vars(managers.ErrorStatusMixin), name
