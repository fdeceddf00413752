"""Op `block_prune_mask`: SparseGPT's unstructured mask for one block of columns.

Contract. With scores `s = w^2 / Hinv_jj^2` over the whole block `W1 [rows, count]`, prune
`s <= sorted(s)[int(numel * sparsity)]` (the reference's rule: without ties one more than
`int(numel * sparsity)`). Returns the keep-mask (True = kept), bool `[rows, count]`.
"""

from __future__ import annotations

import torch

from ..masks import threshold_prune_mask


def torch_block_prune_mask(
    W1: torch.Tensor, hinv_diag: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """Reference `block_prune_mask` (one selection, then the `<=` rule)."""
    return ~threshold_prune_mask(W1**2 / hinv_diag.reshape(1, -1) ** 2, sparsity)
