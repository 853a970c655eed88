"""The house's walls: packages import only downwards, no module imports itself through others, and the
streaming side of ``shards`` loads no builder, no ingest and no DICOM reader.

Imports are read statically (``ast``, every import statement including those inside functions), so a lazy
import that would close a cycle or cross a wall counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A package may import only itself and packages of a lower level.
LEVELS = {"core": 0, "ingest": 1, "bucketing": 1, "shards": 2, "train": 3, "radstream": 4}
STREAMING_ENTRIES = ("shards.loader", "shards.loader_config", "shards.remote", "shards.manifest")
BUILDER_PREFIXES = ("shards.build", "ingest", "pydicom")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in LEVELS for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


@cache
def _imports(module: str) -> frozenset[str]:
    """Every module named by an import statement of ``module`` (ours resolved to the module, others as
    written); ``from pkg import name`` counts ``pkg.name`` when that is one of our modules."""
    path = _modules()[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, path.name == "__init__.py")
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in _modules())
    return frozenset(found)


def _ours(module: str) -> set[str]:
    return {m for m in _imports(module) if m in _modules() and m != module}


def test_packages_import_only_downwards() -> None:
    wrong = []
    for module in _modules():
        own = module.split(".")[0]
        for target in _imports(module):
            pkg = target.split(".")[0]
            if pkg in LEVELS and pkg != own and LEVELS[pkg] >= LEVELS[own]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports across or up the layers:\n" + "\n".join(sorted(wrong))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", sorted(LEVELS))
def test_no_import_cycles_between_modules(package: str) -> None:
    graph = {m: _ours(m) for m in _modules()}
    cycles = [c for c in _cycles(graph) if any(m.split(".")[0] == package for m in c)]
    assert not cycles, "modules that import each other: " + "; ".join(" ↔ ".join(c) for c in cycles)


def _closure(entries: tuple[str, ...]) -> set[str]:
    seen, todo = set(), list(entries)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module in _modules():
            todo.extend(_imports(module))
    return seen


def test_streaming_side_never_names_the_builder() -> None:
    """Statically, even through lazy imports: nothing the loader can reach imports the build or DICOM."""
    reached = _closure(STREAMING_ENTRIES)
    leaks = sorted(m for m in reached if m.startswith(BUILDER_PREFIXES))
    assert not leaks, f"the streaming side reaches {leaks}"


def test_loader_imports_without_builder_ingest_or_pydicom() -> None:
    code = (
        "import sys, shards.loader, shards.loader_config\n"
        "from shards.loader import ShardLoader, build_loader\n"
        "from shards.loader_config import LoaderConfig\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({BUILDER_PREFIXES!r}))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
