"""The package's import rules: each floor imports only the floors below it, modules below the
application never import the package root, former module paths still import (with a warning),
and the version is declared once (the package and setup.py agree)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fastprune

ROOT = Path(fastprune.__file__).parent
REPO = ROOT.parent
# the floors, lowest first: a module or subpackage of fastprune/ imports only from floors
# below its own (and from itself); the root's __init__/__main__ sit above all of them
FLOORS = (
    {"version", "masks", "timing"},
    {"validation"},
    {"quant"},
    {"result"},
    {"layers", "hessian"},
    {"models", "data", "original", "testing", "moved"},
    {"evaluate", "ops"},
    {"solvers"},
    {"methods"},
    {"config", "streaming"},
    {"pipeline", "compat"},
    {"app"},
)
# installed beside the package's own files (setup.py's package_dir, the ahead-of-time build)
BESIDE = {"csrc", "triton_kernels", "_cuda_ext"}


def unit_of(path: Path) -> str:
    """The module or subpackage of fastprune/ that `path` belongs to."""
    return path.relative_to(ROOT).with_suffix("").parts[0]


def low_modules() -> list[Path]:
    top = {"__init__", "__main__", "app"}
    return [p for p in sorted(ROOT.rglob("*.py")) if unit_of(p) not in top]


def imported_units(path: Path) -> set[str]:
    """The modules/subpackages of fastprune/ that `path` imports (at any depth of its code)."""
    rel = path.relative_to(ROOT)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fastprune.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "fastprune" and len(parts) > 1:
                    out.add(parts[1])
                continue
            base = list(rel.parent.parts)[: len(rel.parts) - node.level]
            mod = base + (node.module.split(".") if node.module else [])
            out |= {mod[0]} if mod else {a.name for a in node.names}
    return out - {unit_of(path)}


def root_imports(path: Path) -> list[str]:
    """What `path` imports from the package root: `import fastprune`, `from fastprune import
    x` and relative imports that resolve to the root, each name that is not a subpackage."""
    depth = len(path.relative_to(ROOT).parts) - 1  # 0 for fastprune/x.py
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name == "fastprune"]
        elif isinstance(node, ast.ImportFrom):
            to_root = (node.level == 0 and node.module == "fastprune") or (
                node.level == depth + 1 and node.module is None
            )
            if to_root:
                out += [
                    a.name
                    for a in node.names
                    if not (ROOT / f"{a.name}.py").is_file()
                    and not (ROOT / a.name).is_dir()
                    and a.name not in BESIDE
                ]
    return out


def test_low_modules_never_import_the_package_root():
    found = {str(p.relative_to(REPO)): root_imports(p) for p in low_modules()}
    assert {k: v for k, v in found.items() if v} == {}
    assert len(found) > 50  # the walk did find the package


def test_each_floor_imports_only_the_floors_below():
    floor = {u: i for i, units in enumerate(FLOORS) for u in units}
    units = {unit_of(p) for p in low_modules()} | {"app"}
    assert units <= set(floor), f"modules on no floor: {sorted(units - set(floor))}"
    upward = {}
    for p in sorted(ROOT.rglob("*.py")):
        u = unit_of(p)
        if u in ("__init__", "__main__"):
            continue
        bad = sorted(t for t in imported_units(p) - BESIDE if floor.get(t, -1) >= floor[u])
        if bad:
            upward[str(p.relative_to(REPO))] = bad
    assert upward == {}


def test_the_floor_rule_sees_each_form_of_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "a.py").write_text(
        "from ..pipeline import x\nfrom . import y\nimport fastprune.app.cli\n"
        "def f():\n    from fastprune.solvers import z\n    from .. import models\n"
    )
    assert imported_units(tmp_path / "ops" / "a.py") == {"pipeline", "app", "solvers", "models"}


@pytest.mark.parametrize("old", ["fastprune.cli", "fastprune.workflow", "fastprune.obs"])
def test_former_module_paths_import_with_a_warning(old):
    import importlib

    from fastprune.moved import MOVED

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(MOVED[old])


def test_the_rule_catches_a_root_import(tmp_path, monkeypatch):
    """The check above would see each way of importing the root."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "ops").mkdir()
    cases = {
        "ops/a.py": ("from .. import __version__\n", ["__version__"]),
        "b.py": ("from . import METHODS\n", ["METHODS"]),
        "ops/c.py": ("def f():\n    import fastprune\n", ["fastprune"]),
        "ops/d.py": ("from fastprune import prune_model\n", ["prune_model"]),
        "ops/e.py": ("from .. import ops, csrc\nfrom ..version import __version__\n", []),
    }
    for rel, (text, want) in cases.items():
        (tmp_path / rel).write_text(text)
        assert root_imports(tmp_path / rel) == want, rel


def test_version_declared_once():
    from fastprune.version import __version__

    assert fastprune.__version__ == __version__
    if not (REPO / "setup.py").is_file():
        pytest.skip("not a source checkout")
    out = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == __version__
