"""The package's layout, read from its source with ``ast`` (nothing is imported or run).

* No import cycles among the package's modules. Every import counts: top level, inside
  functions, under ``if TYPE_CHECKING``. ``from pkg import name`` counts as importing
  ``pkg.name`` when that is a module. Importing ``a.b.c`` is an edge to ``a.b.c`` only, not to
  the packages ``a`` and ``a.b``: their ``__init__`` modules are near-empty faces here, and
  counting them would make every module that imports a sibling "cycle" through its package.
* ``core`` and ``exceptions`` (the fal contract) import nothing from ``airflow``, directly or
  through other modules of the package. Here the enclosing packages do count: importing
  ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``, so an ``airflow`` import there would reach
  the contract at run time.
* The emulator imports only the standard library and itself, with one exception: its
  ``signing`` module may import ``cryptography`` (Ed25519 for fal's webhook signatures, which
  the standard library lacks; Airflow installs it). :data:`EMULATOR_EXTRA_IMPORTS` names
  exactly that module and that package; no other module, and no other package.
* No module is longer than :data:`MAX_LINES` lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "airflow_provider_fal"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 400
AIRFLOW_FREE = ("airflow_provider_fal.core", "airflow_provider_fal.exceptions")
EMULATOR_EXTRA_IMPORTS = {f"{PACKAGE}.emulator.signing": "cryptography"}  # module -> the one package it may add


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imported_names(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports (absolute names), package-internal or not."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    found = modules()
    known = set(found)
    return {name: {dep for dep in imported_names(name, path, known) if dep in known} for name, path in found.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module, or of one that imports itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, pending = {start}, [start]
    while pending:
        for nxt in graph.get(pending.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                pending.append(nxt)
    return seen


def with_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` plus an edge from every module to its enclosing packages (their ``__init__`` runs first)."""
    parents = {name: {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)} for name in graph}
    return {name: deps | (parents[name] & set(graph)) for name, deps in graph.items()}


def in_scope(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c"], ["e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_every_kind_of_import():
    found = modules()
    known = set(found)
    trigger = imported_names("airflow_provider_fal.triggers.fal", found["airflow_provider_fal.triggers.fal"], known)
    assert "airflow.triggers.base" in trigger and "airflow_provider_fal.core.watch" in trigger
    emulator_core = found["airflow_provider_fal.emulator.core"]
    assert "airflow_provider_fal.emulator.gateway" in imported_names(
        "airflow_provider_fal.emulator.core", emulator_core, known
    )  # "from . import gateway" is the module, not the package


def test_the_import_reader_resolves_every_form(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import p.x\n"
        "from . import y\n"  # a submodule: the module itself
        "from .y import NAME\n"
        "from .. import q\n"  # not a module: the package
        "if TYPE_CHECKING:\n"
        "    from p.sub import z\n"
        "def later():\n"
        "    import json\n"
    )
    known = {"p", "p.x", "p.sub", "p.sub.y", "p.sub.z", "p.sub.mod"}
    assert imported_names("p.sub.mod", source, known) == {"typing", "p", "p.x", "p.sub.y", "p.sub.z", "json"}


def test_enclosing_packages_count_for_reachability():
    graph = with_packages({"p": set(), "p.a": set(), "p.a.b": set()})
    assert reachable(graph, "p.a.b") == {"p", "p.a", "p.a.b"}


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_the_fal_contract_imports_nothing_from_airflow():
    graph = with_packages(import_graph())
    found = modules()
    known = set(found)
    offenders = []
    for name in found:
        if not in_scope(name, AIRFLOW_FREE):
            continue
        for module in sorted(reachable(graph, name)):
            airflow = sorted(
                dep
                for dep in imported_names(module, found[module], known)
                if dep == "airflow" or dep.startswith("airflow.")
            )
            if airflow:
                offenders.append(f"{name} reaches {module}, which imports {airflow}")
    assert not offenders, "\n".join(offenders)


def emulator_may_import(name: str, dep: str) -> bool:
    """Whether emulator module ``name`` may import ``dep``: the standard library, the emulator, or its one exception."""
    top = dep.split(".")[0]
    if in_scope(dep, (f"{PACKAGE}.emulator",)) or top in sys.stdlib_module_names or top == "__future__":
        return True
    return EMULATOR_EXTRA_IMPORTS.get(name) == top


def test_the_emulator_exception_is_exactly_one_module_and_one_package():
    signing = f"{PACKAGE}.emulator.signing"
    assert emulator_may_import(signing, "cryptography.hazmat.primitives.asymmetric.ed25519")
    assert emulator_may_import(signing, "hashlib")
    assert not emulator_may_import(signing, "nacl.signing")
    assert not emulator_may_import(signing, "cryptographyx")
    assert not emulator_may_import(f"{PACKAGE}.emulator.webhooks", "cryptography.hazmat")
    assert not emulator_may_import(f"{PACKAGE}.emulator.core", "requests")
    assert not emulator_may_import(signing, f"{PACKAGE}.core.http")


def test_the_emulator_uses_only_the_standard_library_and_itself():
    found = modules()
    known = set(found)
    assert set(EMULATOR_EXTRA_IMPORTS) <= set(found), "the allowed exception names a module that is gone"
    offenders = []
    for name, path in found.items():
        if not in_scope(name, (f"{PACKAGE}.emulator",)):
            continue
        offenders.extend(
            f"{name} imports {dep}"
            for dep in sorted(imported_names(name, path, known))
            if not emulator_may_import(name, dep)
        )
    assert not offenders, "\n".join(offenders)


def test_no_module_is_too_long():
    long = {
        name: count for name, path in modules().items() if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
