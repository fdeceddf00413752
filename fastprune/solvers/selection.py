"""The skeleton of the score-based solvers (magnitude, Wanda, GBLM): the common checks, the
exact power-of-two rescaling of out-of-range layers (the score is computed on the rescaled
copy, no second call of the solver), selection by the score without weight updates, and the
loss `tr(D H D^T)` of the pruned part where `H` is given."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..core import base_info, finish, problem_scales, solve_rescaled
from ..hessian import layer_loss
from ..masks import selection_prune_mask
from ..result import PruneResult
from ..validation import check_hessian, check_inplace, check_pattern, check_sparsity, check_weight

# score(W, H, eh): the layer's score from (possibly rescaled) W and H; `eh` is the exponent H
# was divided by (2^eh), for inputs that scale with it (GBLM's G scales as sqrt(H))
Score = Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]


def score_solver(
    method: str,
    W: torch.Tensor,
    H: torch.Tensor | None,
    sparsity: float,
    prune_n: int,
    prune_m: int,
    score: Score,
    *,
    per_row: bool,
    needs_h: bool = True,
    inplace: bool = False,
    check: Callable[[torch.Tensor], None] | None = None,
    extra: dict | None = None,
) -> PruneResult:
    """Prune `W` by `score`: per row (Wanda, GBLM) or one threshold over the layer
    (magnitude), N:M per group. Checks `W`, `H` (if `needs_h` or given), the method's own
    inputs (`check(W)`), sparsity and pattern; a layer whose W or H is outside the solve's
    range is scored and pruned on an exactly rescaled copy and scaled back
    (`core.solve_rescaled`)."""
    t0 = time.perf_counter()
    W = check_weight(W)
    check_inplace(inplace, W)
    if needs_h or H is not None:
        check_hessian(H, W.shape[1], W.device)
    if check is not None:
        check(W)
    s = check_sparsity(sparsity)
    n, m = check_pattern(prune_n, prune_m, W.shape[1])

    def solve(Wx: torch.Tensor, Hx: torch.Tensor | None, eh: int, keep_inplace: bool):
        pruned = selection_prune_mask(score(Wx, Hx, eh), s, n, m, per_row=per_row)
        info = base_info(method, Wx, s, n, m, "torch")
        info.update(extra or {})
        info["selection"] = "per N:M group" if n else ("per row" if per_row else "whole layer")
        loss = None
        if Hx is not None:  # the pruned part of W is exactly W * pruned
            D = torch.where(pruned, Wx, torch.zeros((), dtype=Wx.dtype, device=Wx.device))
            loss = layer_loss(D, torch.zeros_like(D), Hx)
        return finish(Wx, Wx.masked_fill(pruned, 0), ~pruned, loss, info, t0, keep_inplace)

    scales = problem_scales(W, H)
    if scales is None:
        return solve(W, H, 0, inplace)
    return solve_rescaled(W, H, scales, lambda Ws, Hs: solve(Ws, Hs, scales[1], False), t0, inplace)
