"""Layering: lower packages never import higher ones; pure packages do no IO."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import meshproxy

# The package under test, wherever it is installed (CI's second pass runs these tests against
# the wheel in site-packages, whose .py files sit beside the compiled modules).
PACKAGE = Path(meshproxy.__file__).resolve().parent
PURE = ("codec", "routing", "config")
HIGHER = (
    "meshproxy.proxy",
    "meshproxy.observe",
    "meshproxy.runtime",
    "meshproxy.cli",
    "meshproxy.upstream",
)
IO_MODULES = ("asyncio", "socket", "ssl")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_import_nothing_above_them(package: str) -> None:
    for path in (PACKAGE / package).rglob("*.py"):
        found = imports(path)
        bad = {m for m in found for h in HIGHER if m == h or m.startswith(h + ".")}
        assert not bad, f"{path.name} imports {bad}"
        if path.name != "watch.py":  # the watcher is the one IO module of config/
            io = {m for m in found if m.split(".")[0] in IO_MODULES}
            assert not io, f"{path.name} does IO via {io}"


def test_only_observe_imports_metrics_libraries() -> None:
    for path in PACKAGE.rglob("*.py"):
        if "observe" in path.parts:
            continue
        found = imports(path)
        assert not {m for m in found if m.startswith(("prometheus_client", "opentelemetry"))}, path
