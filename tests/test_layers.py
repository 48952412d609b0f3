"""Imports go one way: no cycles, and no module imports a floor above its own.

Every import is read from the source with ``ast``, function-local ones included (a lazy import
is still a dependency). The floors come from the one layer map, :mod:`memexport.core.layers`,
which the README's *Layout* section draws too.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

from memexport.core.layers import FACADE as PACKAGE
from memexport.core.layers import FLOORS, drawing, floor_of

ROOT = Path(__file__).resolve().parents[1]

# `memexport.Predictor` and `memexport.MultiPredictor` are the public facade: the package resolves them lazily on first use.
FACADE = {(PACKAGE, "memexport.runtime.predictor"), (PACKAGE, "memexport.runtime.multi")}


def package_dirs() -> dict[str, Path]:
    """Package name -> folder, as the import system finds them (the map's packages and the top one)."""
    names = [PACKAGE] + [package for floor in FLOORS for package in floor.packages]
    return {name: Path(importlib.util.find_spec(name).submodule_search_locations[0]) for name in names}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def layer(module: str) -> tuple[int, str]:
    """(rank, name) of a module's floor; export and calibration share rank 2."""
    floor = floor_of(module)
    return floor.rank, floor.name


def resolve(node: ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    base = node.module or ""
    if node.level:
        parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(parts + ([base] if base else []))
    targets = []
    for alias in node.names:
        child = f"{base}.{alias.name}"
        targets.append(child if child in known else base)
    return targets


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """memexport modules that ``module`` imports anywhere in its source (each resolved to a known module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(resolve(node, module, path.stem == "__init__", known))
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]  # `import memexport.runtime.cuda.x` -> the module that exists
        if name and name != module:
            out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {module: imports_of(module, path, known) for module, path in found.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in edges.items():
        rank, name = layer(module)
        for target in sorted(targets):
            if (module, target) in FACADE or target == PACKAGE:
                continue  # every module's import runs the package __init__; it is the bottom leaf
            target_rank, target_name = layer(target)
            if target_rank > rank or (name == "export" and target_name == "calibration"):
                bad.append(f"{module} ({name}) imports {target} ({target_name})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if (node, target) in FACADE:
                continue
            if target not in index:
                visit(target)
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_is_found_and_parsed():
    edges = graph()
    assert {"memexport.cli", "memexport.runtime.registry", "memexport.export.tensorrt", "memexport.calibration",
            "memexport.serve.service", "memexport.triton.writer"} <= set(edges)
    assert "memexport.runtime.base" in edges["memexport.runtime.registry"]
    # a function-local import counts: the ONNX Runtime runner imports the budget module inside activate()
    assert "memexport.runtime.budget" in edges["memexport.runtime.onnxruntime_runner"]


def test_no_upward_imports():
    assert upward_imports(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_runtime_imports_neither_export_nor_calibration():
    edges = graph()
    bad = [f"{m} -> {t}" for m, ts in edges.items() if layer(m)[1] == "runtime" for t in ts
           if t.startswith(("memexport.export", "memexport.calibration"))]
    assert bad == []


@pytest.mark.parametrize(
    "edges, expected",
    [
        ({"memexport.runtime.a": {"memexport.export.b"}, "memexport.export.b": set()}, ["memexport.runtime.a (runtime) imports memexport.export.b (export)"]),
        ({"memexport.export.a": {"memexport.calibration.b"}, "memexport.calibration.b": set()}, ["memexport.export.a (export) imports memexport.calibration.b (calibration)"]),
        ({"memexport.calibration.b": {"memexport.export.a"}, "memexport.export.a": set()}, []),
        ({"memexport.pipeline": {"memexport.cli"}, "memexport.cli": set()}, ["memexport.pipeline (pipeline) imports memexport.cli (cli)"]),
    ],
)
def test_the_checker_catches_upward_imports(edges, expected):
    assert upward_imports(edges) == expected


def test_the_checker_catches_cycles_through_local_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from memexport.runtime import b\n    import memexport.runtime.c.d\n")
    known = {"memexport.runtime.a", "memexport.runtime.b", "memexport.runtime.c"}
    assert imports_of("memexport.runtime.a", source, known) == {"memexport.runtime.b", "memexport.runtime.c"}
    edges = {"memexport.runtime.a": {"memexport.runtime.b"}, "memexport.runtime.b": {"memexport.runtime.c"}, "memexport.runtime.c": {"memexport.runtime.a"}}
    assert cycles(edges) == [["memexport.runtime.a", "memexport.runtime.b", "memexport.runtime.c"]]


def test_every_source_folder_is_a_floor():
    """A new top-level package folder must be placed on the map, not fall to the pipeline floor by default."""
    folders = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file() and path.name != "tests"}
    mapped = {Path(p).name for p in package_dirs().values()}
    assert folders <= mapped, f"folders missing from memexport.core.layers: {sorted(folders - mapped)}"


def test_every_package_under_the_top_folder_is_on_the_map():
    """A package inside memexport/ (serve/, triton/) is on the map, so its modules are checked and installed."""
    top = package_dirs()[PACKAGE]
    found = {".".join((PACKAGE, *path.parent.relative_to(top).parts)) for path in top.rglob("__init__.py") if path.parent != top}
    mapped = {package for floor in FLOORS for package in floor.packages}
    assert found and found <= mapped, f"packages missing from memexport.core.layers: {sorted(found - mapped)}"


def test_every_mapped_package_is_installed_with_its_resources():
    """pyproject's setuptools packages list every package on the map, and the page ships as package data."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    mapped = {package for floor in FLOORS for package in floor.packages}
    assert mapped <= set(setuptools["packages"]), sorted(mapped - set(setuptools["packages"]))
    for package, patterns in setuptools["package-data"].items():
        folder = package_dirs()[PACKAGE].joinpath(*package.split(".")[1:])
        assert all(list(folder.glob(pattern)) for pattern in patterns), (package, patterns)
    assert "page.html" in setuptools["package-data"]["memexport.serve"]


def test_lower_floors_never_import_the_top_folder():
    """core/, runtime/, export/, calibration/ and distributed/ import nothing from memexport/'s own modules."""
    edges = graph()
    top = {m for m in edges if m.startswith("memexport.") and floor_of(m).rank >= 3 and not m.startswith("memexport.distributed")}
    bad = [f"{m} -> {t}" for m, ts in edges.items() if floor_of(m).rank < 3 or m.startswith("memexport.distributed")
           for t in ts if t in top]
    assert bad == []


def test_the_readme_draws_the_one_map():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert drawing() in readme, "README.md's Layout section must contain memexport.core.layers.drawing() verbatim"
