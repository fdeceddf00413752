"""Op `column_losses`: ROSE's pre-pruning losses in one pass over the score matrix.

Contract. For scores `S [rows, cols]` and disjoint column blocks `bounds = [(i1, i2), ...]`:
unstructured (`prune_n == 0`) pre-prunes, in each block, `S <= sorted(S_block)[int(numel *
sparsity)]`; N:M pre-prunes the `prune_n` lowest of every group of `prune_m` columns (the
groups are the blocks, `bounds` unused; a lower column wins an exact tie). The loss matrix is
`L = S` where pre-pruned, else 0. Returns `ColumnLosses(column [cols], block [nblocks])`,
the column sums and block sums of `L` (columns outside every block get 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..masks import nm_prune_mask, threshold_prune_mask


class ColumnLosses(NamedTuple):
    column: torch.Tensor  # [cols]
    block: torch.Tensor  # [nblocks]


def torch_column_losses(
    S: torch.Tensor,
    bounds: list[tuple[int, int]],
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
) -> ColumnLosses:
    """Reference `column_losses` (one kthvalue per block)."""
    if prune_n:
        col = (S * nm_prune_mask(S, prune_n, prune_m)).sum(0)
        return ColumnLosses(col, col.reshape(-1, prune_m).sum(1))
    col = torch.zeros(S.shape[1], dtype=S.dtype, device=S.device)
    blocks = torch.empty(len(bounds), dtype=S.dtype, device=S.device)
    for b, (i1, i2) in enumerate(bounds):
        Sb = S[:, i1:i2]
        Lb = Sb * threshold_prune_mask(Sb, sparsity)
        col[i1:i2] = Lb.sum(0)
        blocks[b] = Lb.sum()
    return ColumnLosses(col, blocks)
