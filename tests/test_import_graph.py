# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The import graph of the project's own modules (``bundle/scripts`` as ``scripts.*``, ``bench`` as ``bench.*``) has no
cycle, and the benchmark scores with the bundle's metrics.

Every ``import`` statement counts, also those inside functions: a lazy import only hides a cycle until the two modules
are imported in the other order. The graph is read with ``ast`` (nothing is imported), so the test takes a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import BUNDLE_ROOT, REPO_ROOT

#: (folder whose files are modules, the folder module names are relative to)
PROJECT_SOURCES = ((BUNDLE_ROOT / "scripts", BUNDLE_ROOT), (REPO_ROOT / "bench", REPO_ROOT))


def module_files(folder: Path, root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under ``folder`` (a package's name is its folder's)."""
    modules = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Dotted names a module imports anywhere in its body: ``import a.b`` gives ``a.b``; ``from a import b`` gives
    ``a`` and ``a.b`` (b may be a submodule or an attribute); relative imports are resolved against the package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: project modules it imports}``; a name resolves to the longest project module it starts with."""
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                if ".".join(parts[:end]) in modules:
                    targets.add(".".join(parts[:end]))
                    break
        graph[module] = targets - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None; depth-first, modules and edges in sorted order."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it was followed
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


@pytest.fixture(scope="module")
def project_graph() -> dict[str, set[str]]:
    modules = {}
    for folder, root in PROJECT_SOURCES:
        modules.update(module_files(folder, root))
    return import_graph(modules)


def test_project_modules_import_no_cycle(project_graph):
    assert len(project_graph) > 50 and "bench.accuracy.runner" in project_graph and "scripts.cli" in project_graph
    cycle = find_cycle(project_graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_lazy_cycle_in_a_synthetic_package(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .leaf import VALUE\n")
    (package / "sub" / "leaf.py").write_text("import os\nVALUE = 1\n")
    (package / "runner.py").write_text("from pkg.sub import VALUE\n\n\ndef main():\n    from pkg import rescore\n")
    (package / "rescore.py").write_text("import json\nfrom . import runner\n")
    graph = import_graph(module_files(package, tmp_path))
    assert graph == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.leaf"},  # relative import from a package's __init__
        "pkg.sub.leaf": set(),  # os: not a project module
        "pkg.runner": {"pkg", "pkg.sub", "pkg.rescore"},  # the import inside main() counts
        "pkg.rescore": {"pkg", "pkg.runner"},
    }
    assert find_cycle(graph) == ["pkg.rescore", "pkg.runner", "pkg.rescore"]
    (package / "rescore.py").write_text("import json\n")  # the cycle broken: nothing found
    assert find_cycle(import_graph(module_files(package, tmp_path))) is None


def test_bench_scores_with_the_bundles_metrics(project_graph):
    # the bench's scoring imports the bundle's metrics and Jacobian ...
    assert {"scripts.workflow.metrics", "scripts.layers.jacobian"} <= project_graph["bench.accuracy.scoring"]
    # ... and no project module but the bundle's metrics computes Dice or HD95 with MONAI itself (one definition each)
    computing = set()
    for folder, root in PROJECT_SOURCES:
        for module, path in module_files(folder, root).items():
            names = imported_names(module, path)
            if any(n.endswith((".compute_dice", ".compute_hausdorff_distance")) for n in names):
                computing.add(module)
    assert computing == {"scripts.workflow.metrics"}
