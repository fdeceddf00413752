"""fastprune: fast, exact one-shot LLM pruning (SparseGPT, ROSE, Wanda, GBLM, SparseSwaps)
and quantization in the same OBS sweep (GPTQ: `gptq_layer`, `quant=` on the OBS solvers).

Layer-level solvers take a weight `W [rows, cols]` and a calibration Hessian
`H = 2/n sum_t x_t x_t^T [cols, cols]` and return a `PruneResult`
(`weight`, keep-`mask`, `loss`, `info`).
"""

from . import moved, testing  # former module paths; synthetic layers for tests and benchmarks
from .app.zeroshot import lm_eval_tasks
from .config import PruneConfig
from .evaluate import perplexity
from .hessian import (
    DiagonalAccumulator,
    HessianAccumulator,
    InverseHessian,
    accumulate_hessian,
    inverse_hessian,
    layer_loss,
)
from .masks import check_nm_keep_mask
from .methods import METHODS
from .models import load_model
from .ops import BackendUnavailableError
from .pipeline import PruneReport, compute_gradient_norms, prune_checkpoint, prune_model
from .quant import QuantizedWeight, QuantSpec, round_to_nearest
from .result import PruneResult
from .solvers import (
    RECIPE,
    GradientNormAccumulator,
    compose_layer,
    fastprune_layer,
    gblm_layer,
    gptq_layer,
    gradient_norm,
    magnitude_layer,
    rose_layer,
    sparsegpt_layer,
    sparseswaps_layer,
    wanda_layer,
)
from .version import __version__ as __version__

moved.install()

__all__ = [
    "BackendUnavailableError",
    "DiagonalAccumulator",
    "GradientNormAccumulator",
    "HessianAccumulator",
    "InverseHessian",
    "METHODS",
    "PruneConfig",
    "PruneReport",
    "PruneResult",
    "QuantSpec",
    "QuantizedWeight",
    "RECIPE",
    "accumulate_hessian",
    "check_nm_keep_mask",
    "compose_layer",
    "compute_gradient_norms",
    "fastprune_layer",
    "gblm_layer",
    "gptq_layer",
    "gradient_norm",
    "inverse_hessian",
    "layer_loss",
    "lm_eval_tasks",
    "load_model",
    "magnitude_layer",
    "perplexity",
    "prune_checkpoint",
    "prune_model",
    "rose_layer",
    "round_to_nearest",
    "sparsegpt_layer",
    "sparseswaps_layer",
    "testing",
    "wanda_layer",
]
