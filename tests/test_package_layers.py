"""The package's import rules: modules below the application never import the package root,
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
# the application: the command, its workflows and launcher, lm-eval, the demo
APPLICATION = {"__init__", "__main__", "cli", "workflow", "launch", "zeroshot", "demo"}
# installed beside the package's own files (setup.py's package_dir, the ahead-of-time build)
INSTALLED_BESIDE = {"csrc", "triton_kernels", "_cuda_ext"}


def low_modules() -> list[Path]:
    return [
        p for p in sorted(ROOT.rglob("*.py")) if not (p.parent == ROOT and p.stem in APPLICATION)
    ]


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
                    and a.name not in INSTALLED_BESIDE
                ]
    return out


def test_low_modules_never_import_the_package_root():
    found = {str(p.relative_to(REPO)): root_imports(p) for p in low_modules()}
    assert {k: v for k, v in found.items() if v} == {}
    assert len(found) > 50  # the walk did find the package


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
