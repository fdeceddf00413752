"""The layer solvers, one module per method, each `(W, H, ...) -> PruneResult` and each
registering its `Method` in `registry.METHODS`: magnitude, wanda, gblm (score selection,
`selection`), sparsegpt (and `sparsegpt_batched` for a projection's experts at once), rose,
sparseswaps, the composed recipes (`compose_layer`, `fastprune_layer`), and gptq
(quantization alone; `quant=` on the OBS solvers quantizes in the pruning sweep)."""

# isort: off
# the order of registration is the order `METHODS` lists the methods (and the CLI offers them)
from . import magnitude, wanda, sparsegpt, rose, gblm, sparseswaps, recipes, compositions, gptq  # noqa: F401

# isort: on
from .gblm import GradientNormAccumulator, gblm_layer, gblm_score, gradient_norm
from .gptq import gptq_layer
from .magnitude import magnitude_layer
from .recipes import RECIPE, compose_layer, fastprune_layer
from .registry import METHODS, Method, Selection, get_method, register, selectors, unregister
from .rose import rose_layer
from .sparsegpt import sparsegpt_layer
from .sparsegpt_batched import inverse_hessians, sparsegpt_experts
from .sparseswaps import sparseswaps_layer
from .wanda import wanda_layer

__all__ = [
    "METHODS",
    "RECIPE",
    "GradientNormAccumulator",
    "Method",
    "Selection",
    "compose_layer",
    "fastprune_layer",
    "gblm_layer",
    "gblm_score",
    "get_method",
    "gptq_layer",
    "gradient_norm",
    "inverse_hessians",
    "magnitude_layer",
    "register",
    "rose_layer",
    "selectors",
    "sparsegpt_experts",
    "sparsegpt_layer",
    "sparseswaps_layer",
    "unregister",
    "wanda_layer",
]
