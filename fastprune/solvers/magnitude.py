"""Magnitude pruning: score `|W|`, one threshold over the whole layer (no calibration)."""

from __future__ import annotations

import torch

from ..result import PruneResult
from .selection import score_solver


@torch.no_grad()
def magnitude_layer(
    W: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    *,
    H: torch.Tensor | None = None,
    inplace: bool = False,
) -> PruneResult:
    """Magnitude pruning: score `|W|`; unstructured prunes exactly `int(numel*sparsity)`
    weights under one threshold over the whole layer (ties broken by position); N:M per
    group. `H` is optional and only used to report the loss."""
    return score_solver(
        "magnitude", W, H, sparsity, prune_n, prune_m, lambda Wx, Hx, eh: Wx.abs(),
        per_row=False, needs_h=False, inplace=inplace,
    )  # fmt: skip
