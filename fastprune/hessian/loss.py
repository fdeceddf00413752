"""The layer loss `tr((W - W_p) H (W - W_p)^T)` of a pruned weight, whole or per row, in
row chunks so that a big layer needs no second full-size temporary."""

from __future__ import annotations

import torch

from ..validation import compute_dtype


def _loss_terms(W: torch.Tensor, Wp: torch.Tensor, H: torch.Tensor):
    """`(D H) * D` for `D = W - W_p`, a chunk of rows at a time (float32, float64 for float64
    inputs), so a big layer does not need a second rows x cols temporary at once."""
    dtype = compute_dtype(W, H)
    D = W.to(dtype) - Wp.to(dtype)
    Hc = H.to(dtype)
    step = max(1, (1 << 24) // max(1, W.shape[1]))
    for r0 in range(0, D.shape[0], step):
        Dr = D[r0 : r0 + step]
        yield (Dr @ Hc) * Dr


def layer_loss(W: torch.Tensor, Wp: torch.Tensor, H: torch.Tensor) -> float:
    """`tr((W - W_p) H (W - W_p)^T)`, computed in float32 (float64 for float64 inputs)."""
    total = 0.0
    for t in _loss_terms(W, Wp, H):
        total += t.sum(dtype=torch.float64).item()
    return float(total)


def row_losses(W: torch.Tensor, Wp: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Each row's `d H d^T` (`d = w - w_p`) as float64: the terms of `layer_loss`."""
    return torch.cat([t.sum(1, dtype=torch.float64) for t in _loss_terms(W, Wp, H)])


__all__ = ["layer_loss", "row_losses"]
