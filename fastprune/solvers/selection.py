"""The common end of the score-based solvers (magnitude, Wanda, GBLM): prune by a score,
without weight updates, and report the loss `tr(D H D^T)` of the pruned part where `H` is
given."""

from __future__ import annotations

import torch

from ..core import base_info, finish
from ..hessian import layer_loss
from ..masks import selection_prune_mask
from ..result import PruneResult


def prune_by_score(
    method: str,
    W: torch.Tensor,
    H: torch.Tensor | None,
    score: torch.Tensor,
    sparsity: float,
    n: int,
    m: int,
    per_row: bool,
    t0: float,
    inplace: bool,
    extra: dict | None = None,
) -> PruneResult:
    pruned = selection_prune_mask(score, sparsity, n, m, per_row=per_row)
    info = base_info(method, W, sparsity, n, m, "torch")
    info.update(extra or {})
    info["selection"] = "per N:M group" if n else ("per row" if per_row else "whole layer")
    loss = None
    if H is not None:  # the pruned part of W is exactly W * pruned
        D = torch.where(pruned, W, torch.zeros((), dtype=W.dtype, device=W.device))
        loss = layer_loss(D, torch.zeros_like(D), H)
    return finish(W, W.masked_fill(pruned, 0), ~pruned, loss, info, t0, inplace)
