"""Selection by a score without weight updates (magnitude, Wanda, GBLM): the algorithm those
solvers run in the common skeleton (`skeleton.run_solver`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..hessian import layer_loss
from ..masks import selection_prune_mask
from .skeleton import Outcome, Problem

# the layer's score from the (possibly rescaled) problem
Score = Callable[[Problem], torch.Tensor]


def by_score(score: Score, *, per_row: bool) -> Callable[[Problem], Outcome]:
    """The algorithm that prunes the lowest `score`: per row (Wanda, GBLM) or under one
    threshold over the layer (magnitude), N:M per group; the loss `tr(D H D^T)` of the
    pruned part `D` where H is given."""

    def select(p: Problem) -> Outcome:
        pruned = selection_prune_mask(score(p), p.sparsity, p.n, p.m, per_row=per_row)
        p.info["selection"] = "per N:M group" if p.n else ("per row" if per_row else "whole layer")
        loss = None
        if p.H is not None:  # the pruned part of W is exactly W * pruned
            D = torch.where(pruned, p.W, torch.zeros((), dtype=p.W.dtype, device=p.W.device))
            loss = layer_loss(D, torch.zeros_like(D), p.H)
        return Outcome(p.W.masked_fill(pruned, 0), ~pruned, loss)

    return select
