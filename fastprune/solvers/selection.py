"""Selection by a score without weight updates (magnitude, Wanda, GBLM): the algorithm those
solvers run in the common skeleton (`skeleton.run_solver`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..hessian import layer_loss
from ..masks import selection_prune_mask
from .skeleton import Outcome, Problem

# the layer's score from the (possibly rescaled) problem: a function of a slice of rows
Score = Callable[[Problem], Callable[[slice], torch.Tensor]]
# a selection made row by row scores and sorts at most this many weights at once
ROW_CHUNK_ELEMENTS = 1 << 22


def by_score(score: Score, *, per_row: bool) -> Callable[[Problem], Outcome]:
    """The algorithm that prunes the lowest `score`: per row (Wanda, GBLM) or under one
    threshold over the layer (magnitude), N:M per group; the loss `tr(D H D^T)` of the
    pruned part `D` where H is given in full. A selection made row by row (per row, or N:M)
    runs on chunks of rows, so its score and sort never hold the whole layer at once."""

    def select(p: Problem) -> Outcome:
        rows, cols = p.W.shape
        of_rows = score(p)
        step = max(1, ROW_CHUNK_ELEMENTS // cols) if per_row or p.n else rows
        pruned = torch.empty(p.W.shape, dtype=torch.bool, device=p.W.device)
        for r0 in range(0, rows, step):
            r = slice(r0, min(rows, r0 + step))
            pruned[r] = selection_prune_mask(of_rows(r), p.sparsity, p.n, p.m, per_row=per_row)
        p.info["selection"] = "per N:M group" if p.n else ("per row" if per_row else "whole layer")
        loss = None
        if p.H is not None and p.H.dim() == 1:
            p.info["hessian"] = "diagonal (no layer loss)"
        elif p.H is not None:  # the pruned part of W is exactly W * pruned
            D = torch.where(pruned, p.W, torch.zeros((), dtype=p.W.dtype, device=p.W.device))
            loss = layer_loss(D, torch.zeros_like(D), p.H)
        return Outcome(p.W.masked_fill(pruned, 0), ~pruned, loss)

    return select
