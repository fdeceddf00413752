"""Module paths that moved when the package was laid out by floors, still importable under
their former names with a `DeprecationWarning` (`import fastprune.cli` gives
`fastprune.app.cli`, the same module object)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "fastprune.cli": "fastprune.app.cli",
    "fastprune.workflow": "fastprune.app.workflow",
    "fastprune.launch": "fastprune.app.launch",
    "fastprune.zeroshot": "fastprune.app.zeroshot",
    "fastprune.demo": "fastprune.app.demo",
    "fastprune.saving": "fastprune.app.saving",
    "fastprune.core": "fastprune.solvers.core",
    "fastprune.obs": "fastprune.solvers.obs",
    "fastprune.block_layers": "fastprune.pipeline.block_layers",
    "fastprune.experts": "fastprune.pipeline.experts",
    "fastprune.asymmetric": "fastprune.pipeline.asymmetric",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a former module path and loads it as the module that now lives elsewhere."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2
        )
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        """The module is the moved one, already executed."""


def install() -> None:
    """Put the finder on `sys.meta_path` once."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
