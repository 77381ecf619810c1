"""The layout of ``bundle/scripts`` stays what docs/architecture.md says: imports only point down the package ladder and
every module carries the licence header. Files are split by concept, not by a line count (there is no size cap)."""

import ast
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "bundle" / "scripts"
HEADER = "# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0."

# bottom to top; a module may import from its own package and from any lower rank
RANK = {"io": 0, "layers": 1, "networks": 2, "losses": 2, "spatial": 2, "engines": 3, "workflow": 4, "cli": 5}
MODULES = sorted(p for p in SCRIPTS.rglob("*.py") if "__pycache__" not in p.parts)


def _package(path: Path) -> str:
    relative = path.relative_to(SCRIPTS)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_packages(path: Path) -> set[str]:
    """Our sub-packages that ``path`` imports (absolute ``scripts.<pkg>`` imports, module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "scripts" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_the_concepts_are_folders():
    folders = {p.name for p in SCRIPTS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert {"io", "layers", "networks", "losses", "engines", "workflow"} <= folders
    loose = {p.name for p in SCRIPTS.glob("*.py")}
    assert loose == {"__init__.py", "cli.py"}, f"modules outside the concept folders: {loose}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SCRIPTS)))
def test_imports_point_down(path):
    own = _package(path)
    if own == "__init__":
        return
    assert own in RANK, f"{path} is in a package docs/architecture.md does not know: {own}"
    upward = {pkg for pkg in _imported_packages(path) if pkg in RANK and pkg != own and RANK[pkg] >= RANK[own]}
    assert not upward, f"{path.relative_to(SCRIPTS)} ({own}) imports from the same level or above: {sorted(upward)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SCRIPTS)))
def test_licence_header(path):
    assert path.read_text().startswith(HEADER), f"{path} lacks the licence header"


def test_checker_sees_an_upward_import(tmp_path):
    """The import scanner finds imports inside functions too (a lazy upward import is still an upward import)."""
    module = tmp_path / "mod.py"
    module.write_text("def f():\n    from scripts.workflow.qc import save_qc_png\n    import scripts.engines\n")
    assert _imported_packages(module) == {"workflow", "engines"}


def test_one_atomic_writer_and_one_spacing():
    definitions = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                definitions.setdefault(node.name, []).append(path.relative_to(SCRIPTS))
    for name in ("write_json", "write_csv", "atomic_path", "voxel_spacing"):
        assert len(definitions.get(name, [])) == 1, f"{name} defined in {definitions.get(name)}"
    assert not {"_spacing", "write_json_atomic", "write_csv_atomic"} & set(definitions)
