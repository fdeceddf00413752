"""Op `block_prune_mask`: SparseGPT's unstructured mask for one block of columns.

Contract. With scores `s = w^2 / Hinv_jj^2` over the whole block `W1 [rows, count]`, prune
`s <= sorted(s)[int(numel * sparsity)]` (the reference's rule: without ties one more than
`int(numel * sparsity)`). Returns the keep-mask (True = kept), bool `[rows, count]`.
Batched form: `W1 [E, rows, count]`, `hinv_diag [E, count]`: each layer's block with its own
threshold; the mask gains the leading `E`.
"""

from __future__ import annotations

import torch

from ..masks import threshold_prune_mask


def torch_block_prune_mask(
    W1: torch.Tensor, hinv_diag: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """Reference `block_prune_mask` (one selection per layer, then the `<=` rule)."""
    score = W1**2 / hinv_diag[..., None, :] ** 2
    return ~threshold_prune_mask(score, sparsity, start_dim=W1.dim() - 2)
