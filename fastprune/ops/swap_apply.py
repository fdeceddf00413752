"""Op `swap_apply`: apply one chosen 1-swap per row, in place.

Contract. For each i: `keep[rows_i, u_i] = False`, `keep[rows_i, p_i] = True` and
`c[rows_i] += w[rows_i, u_i] H[u_i, :] - w[rows_i, p_i] H[p_i, :]` (H symmetric, so rows of
H are gathered), keeping `c = (w * ~keep) @ H`. `rows` are distinct. Returns None; `keep`
and `c` are updated in place, `w` and `H` are not touched.
"""

from __future__ import annotations

import torch


def torch_swap_apply(
    w: torch.Tensor,
    keep: torch.Tensor,
    c: torch.Tensor,
    H: torch.Tensor,
    rows: torch.Tensor,
    u: torch.Tensor,
    p: torch.Tensor,
) -> None:
    """Reference `swap_apply` (advanced indexing)."""
    if rows.numel() == 0:
        return
    wu = w[rows, u]
    wpv = w[rows, p]
    keep[rows, u] = False
    keep[rows, p] = True
    c[rows] += wu[:, None] * H[u] - wpv[:, None] * H[p]
