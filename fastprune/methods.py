"""The registry of pruning methods, `METHODS`, under its former home.

Each method's module declares and registers its `Method` (`fastprune.solvers.registry`);
`composed` turns a mask selector into a composition (`fastprune.solvers.recipes`). A method
registered with `register` is accepted by `prune_model` and offered by the CLI, and a mask
selector (a method with a `Selection` hook) by `compose_layer(select=...)` as well.
"""

from .solvers.compositions import composed
from .solvers.recipes import COMPOSE_OPTIONS
from .solvers.registry import (
    BATCH_MAX_ENTRIES,
    GRADIENT_OPTIONS,
    METHODS,
    Method,
    Selection,
    get_method,
    methods_where,
    methods_with,
    register,
    selectors,
    unregister,
)
from .solvers.sparseswaps import (
    CPU_SWAP_PAIR_BUDGET,
    GPU_SWAP_PAIR_BUDGET,
    MAX_AUTO_SWAPS,
    auto_max_swaps,
)

__all__ = [
    "BATCH_MAX_ENTRIES",
    "COMPOSE_OPTIONS",
    "CPU_SWAP_PAIR_BUDGET",
    "GPU_SWAP_PAIR_BUDGET",
    "GRADIENT_OPTIONS",
    "MAX_AUTO_SWAPS",
    "METHODS",
    "Method",
    "Selection",
    "auto_max_swaps",
    "composed",
    "get_method",
    "methods_where",
    "methods_with",
    "register",
    "selectors",
    "unregister",
]
