"""Wanda: score `|W| * sqrt(diag(H)/2)`, pruned per output row."""

from __future__ import annotations

import time

import torch

from ..core import problem_scales, solve_rescaled, wanda_score
from ..result import PruneResult
from ..validation import check_hessian, check_inplace, check_pattern, check_sparsity, check_weight
from .selection import prune_by_score


@torch.no_grad()
def wanda_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    *,
    inplace: bool = False,
) -> PruneResult:
    """Wanda: score `|W| * sqrt(diag(H)/2)`; per output row prune the `int(cols*sparsity)`
    lowest (stable sort); N:M per group."""
    t0 = time.perf_counter()
    W = check_weight(W)
    check_inplace(inplace, W)
    check_hessian(H, W.shape[1], W.device)
    s = check_sparsity(sparsity)
    n, m = check_pattern(prune_n, prune_m, W.shape[1])
    scales = problem_scales(W, H)
    if scales is not None:
        solve = lambda Ws, Hs: wanda_layer(Ws, Hs, s, n, m)  # noqa: E731
        return solve_rescaled(W, H, scales, solve, t0, inplace)
    return prune_by_score("wanda", W, H, wanda_score(W, H), s, n, m, True, t0, inplace)
