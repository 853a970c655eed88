"""The house's walls: packages import only downwards, no module imports itself through others, the
streaming side of ``shards`` loads no builder, no ingest and no DICOM reader, and the wheel installs one name.

Every room is a top-level folder of the checkout and a package under ``radstream`` (``train/`` is
``radstream.train``); the console script's own modules (``radstream/``) are the top level.

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
# A room may import only itself and rooms of a lower level; "radstream" is the console script's own modules.
LEVELS = {
    "core": 0,
    "ingest": 1,
    "bucketing": 1,
    "shards": 2,
    "train": 3,
    "eval": 4,
    "report": 5,
    "radstream": 6,
}
STREAMING_ENTRIES = (
    "radstream.shards.loader",
    "radstream.shards.loader_config",
    "radstream.shards.remote",
    "radstream.shards.manifest",
)
BUILDER_PREFIXES = ("radstream.shards.builder", "radstream.ingest", "pydicom")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts if parts[0] == "radstream" else ("radstream", *parts))


def _room(module: str) -> str | None:
    """The room of one of our modules (``radstream.train.mae`` -> ``train``), None for the package root."""
    parts = module.split(".")
    if parts[0] != "radstream" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in LEVELS else "radstream"


@cache
def _modules() -> dict[str, Path]:
    folders = [ROOT / (room if room != "radstream" else "radstream") for room in LEVELS]
    return {_module_name(p): p for folder in folders for p in sorted(folder.rglob("*.py"))}


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
        own = _room(module)
        for target in _imports(module):
            room = _room(target)
            if own and room and room != own and LEVELS[room] >= LEVELS[own]:
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
    cycles = [c for c in _cycles(graph) if any(_room(m) == package for m in c)]
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
        "import sys, radstream.shards.loader, radstream.shards.loader_config\n"
        "from radstream.shards.loader import ShardLoader, build_loader\n"
        "from radstream.shards.loader_config import LoaderConfig\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({BUILDER_PREFIXES!r}))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_room_is_installed_under_radstream() -> None:
    """pyproject installs each package folder of every room as ``radstream.<room>...`` and nothing bare."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {_module_name(p) for room in LEVELS for p in (ROOT / room).rglob("__init__.py")}
    assert set(tool["packages"]) == folders
    assert all(name == "radstream" or name.startswith("radstream.") for name in tool["packages"])
    rooms = {name: folder for name, folder in tool["package-dir"].items() if name != "radstream"}
    assert rooms == {f"radstream.{room}": room for room in LEVELS if room != "radstream"}
