"""Drop-in adapters: the interfaces of the pruners people already run, on fastprune's solvers.

- `SparseGPT(layer)`: the IST-DASLab `SparseGPT` class (`add_batch`, `fasterprune`, `free`),
  with its `--wbits` quantizer if one is attached.
- `ROSE(layer)`: the ROSE repository's class, including its calibration weighting.
- `WrappedGPT(layer)`: Wanda's activation-statistics wrapper (`add_batch`, `scaler_row`),
  plus `prune()` for Wanda's per-layer selection.
- `sparsify_weight(...)`, `quantize_weight(...)`: llm-compressor's SparseGPT `sparsify_weight`
  and GPTQ `quantize_weight` (0.14) contracts, and `patch_llmcompressor()` /
  `unpatch_llmcompressor()` to make an installed llm-compressor's `SparseGPTModifier` and
  `GPTQModifier` call them.

Every adapter solves with `backend="auto"` (the fastest backend for the layer's device) unless
given another backend. `nn.Linear`, `transformers.Conv1D` (weight stored transposed) and
`nn.Conv2d` (weight flattened to `[out, in*kh*kw]`, inputs unfolded into patches) are
supported. Neither transformers nor llm-compressor is imported by this module: a Conv1D layer
can only exist once transformers is imported, and llm-compressor is imported by the patch.
"""

from .adapter import input_columns
from .llmc_gptq import quantize_weight
from .llmcompressor import (
    patch_llmcompressor,
    sparsify_preserving,
    sparsify_weight,
    unpatch_llmcompressor,
)
from .rose import ROSE, rose_with_scaler
from .sparsegpt import SparseGPT
from .wanda import WrappedGPT

__all__ = [
    "ROSE",
    "SparseGPT",
    "WrappedGPT",
    "input_columns",
    "patch_llmcompressor",
    "quantize_weight",
    "rose_with_scaler",
    "sparsify_preserving",
    "sparsify_weight",
    "unpatch_llmcompressor",
]
