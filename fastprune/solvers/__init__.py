"""The layer solvers, one module per method, each `(W, H, ...) -> PruneResult`:
magnitude, wanda, gblm (score selection, `selection`), sparsegpt (and `sparsegpt_batched`
for a projection's experts at once), rose, sparseswaps, and the composed recipes
(`compose_layer`, `fastprune_layer`)."""

from .gblm import GradientNormAccumulator, gblm_layer, gblm_score, gradient_norm
from .magnitude import magnitude_layer
from .recipes import RECIPE, compose_layer, fastprune_layer
from .rose import rose_layer
from .sparsegpt import sparsegpt_layer
from .sparsegpt_batched import inverse_hessians, sparsegpt_experts
from .sparseswaps import sparseswaps_layer
from .wanda import wanda_layer

__all__ = [
    "RECIPE",
    "GradientNormAccumulator",
    "compose_layer",
    "fastprune_layer",
    "gblm_layer",
    "gblm_score",
    "gradient_norm",
    "inverse_hessians",
    "magnitude_layer",
    "rose_layer",
    "sparsegpt_experts",
    "sparsegpt_layer",
    "sparseswaps_layer",
    "wanda_layer",
]
