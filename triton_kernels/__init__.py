"""fastprune's Triton kernels, one kernel family per module (installed as
`fastprune.triton_kernels`). Kernels import nothing of fastprune.

`OPS` maps op names to launchers with the same contracts as the torch reference ops in
`fastprune.ops.torch_ref`; the dispatcher only offers the ops listed here. Importing this
package imports triton (an ImportError here means "no triton backend").
"""

from __future__ import annotations

import importlib

OPS: dict = {}

for _family in ("obs_sweep", "column_losses", "swap_search"):
    try:
        _mod = importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as _e:  # family not written yet: skip; a missing triton: raise
        if _e.name != f"{__name__}.{_family}":
            raise
        continue
    OPS.update(_mod.OPS)
