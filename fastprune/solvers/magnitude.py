"""Magnitude pruning: score `|W|`, one threshold over the whole layer (no calibration)."""

from __future__ import annotations

import time

import torch

from ..core import problem_scales, solve_rescaled
from ..result import PruneResult
from ..validation import check_hessian, check_inplace, check_pattern, check_sparsity, check_weight
from .selection import prune_by_score


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
    t0 = time.perf_counter()
    W = check_weight(W)
    check_inplace(inplace, W)
    if H is not None:
        check_hessian(H, W.shape[1], W.device)
    s = check_sparsity(sparsity)
    n, m = check_pattern(prune_n, prune_m, W.shape[1])
    scales = problem_scales(W, H)
    if scales is not None:
        solve = lambda Ws, Hs: magnitude_layer(Ws, s, n, m, H=Hs)  # noqa: E731
        return solve_rescaled(W, H, scales, solve, t0, inplace)
    return prune_by_score("magnitude", W, H, W.abs(), s, n, m, False, t0, inplace)
