"""The layering stays honest (STYLE.md §7): protocol is a leaf, ledger sits on protocol, node never
reaches into the coordinator or the ledger (but for the ledger's proof format, which its receipts
are kept in), no core package imports `sparecycles` (the SDK and
CLI on top), no module imports itself back through others, and the HTTP adapter asks the
coordinator's query interface instead of reading the engine or the store."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]
CORE = ("protocol", "ledger", "coordinator", "node")
PACKAGES = (*CORE, "sparecycles")
ALLOWED = {
    "protocol": set(),
    "ledger": {"protocol"},
    "node": {"protocol"},
    "coordinator": {"protocol", "ledger"},
    "sparecycles": {"protocol", "ledger", "coordinator", "node"},
}
# A node checks the receipts for its credit itself (node/receipts.py), with the ledger's pure proof
# code rather than a copy of it: these modules do no I/O and know no store.
PROOF_FORMAT = ("ledger.checkpoint", "ledger.merkle", "ledger.errors")
ALSO_ALLOWED = {"node": PROOF_FORMAT}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str) -> Iterator[str]:
    """Every module `path` imports, at any depth (function-level imports too), resolved to absolute
    names; `from x import y` yields both `x` and `x.y` (y may be a submodule)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    for path in files:
        also = ALSO_ALLOWED.get(package, ())
        found = {m.split(".")[0] for m in imports_of(path, module_name(path))
                 if not any(m == a or m.startswith(a + ".") for a in also)} & set(PACKAGES)
        extra = found - ALLOWED[package] - {package}
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}"


def test_no_module_imports_itself_back_through_others() -> None:
    modules = project_modules()
    graph = {name: {m for m in imports_of(path, name) if m in modules and m != name}
             for name, path in modules.items()}
    # A package's __init__ re-exporting its submodules is not a cycle worth flagging; the edge
    # from a submodule up to its own package's __init__ is (it runs that __init__ first).
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_http_adapter_never_reads_the_engine_or_the_store() -> None:
    # The query interface (coordinator/queries.py) is what lets the engine change or be sharded
    # without touching adapters; one `c.engine.jobs` in a handler undoes that.
    path = ROOT / "coordinator" / "http_api.py"
    reached = {node.attr for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Attribute) and node.attr in {"engine", "store"}}
    assert not reached, f"http_api.py reaches into {sorted(reached)}: add a query to coordinator/queries.py"


def test_the_distribution_installs_sparecycles_and_the_core_packages_only() -> None:
    # `cli` and `client` as top-level names shadowed (or were shadowed by) a user's own cli.py.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    top_level = {name.split(".")[0] for name in find_packages(where=str(ROOT), include=include)}
    assert top_level == {"sparecycles", *CORE}
    assert config["project"]["scripts"]["sparecycles"] == "sparecycles.cli.main:main"
