"""Wanda: score `|W| * sqrt(diag(H)/2)`, pruned per output row."""

from __future__ import annotations

import torch

from ..result import PruneResult
from .core import wanda_score
from .registry import Method, Selection, register
from .selection import by_score
from .skeleton import run_solver


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
    lowest (stable sort); N:M per group. `H` may be its diagonal alone, `[cols]` (all Wanda
    reads; the result then has no layer loss)."""
    return run_solver(
        "wanda", W, H, sparsity, prune_n, prune_m,
        by_score(lambda p: lambda r: wanda_score(p.W[r], p.H), per_row=True),
        diagonal_h=True, inplace=inplace,
    )  # fmt: skip


def _select(W, H, sparsity, prune_n, prune_m, **_) -> PruneResult:
    """A composition's mask: Wanda's (the selection hook)."""
    return wanda_layer(W, H, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m)


register(
    Method(
        "wanda",
        wanda_layer,
        "|W| * sqrt(diag(H)/2), per output row",
        reads_diagonal=True,
        select=Selection(_select, row_separable=lambda prune_n: True),  # per output row
    )
)
