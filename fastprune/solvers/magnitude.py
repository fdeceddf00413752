"""Magnitude pruning: score `|W|`, one threshold over the whole layer (no calibration)."""

from __future__ import annotations

import torch

from ..result import PruneResult
from .registry import Method, Selection, register
from .selection import by_score
from .skeleton import legacy_positional, run_solver


def _former_order(args: tuple) -> bool:
    """magnitude_layer(W, sparsity, ...): a number where H now comes."""
    return len(args) > 1 and args[1] is not None and not torch.is_tensor(args[1])


@legacy_positional(
    ("W", "sparsity", "prune_n", "prune_m"),
    _former_order,
    "magnitude_layer(W, H=None, sparsity=..., prune_n=..., prune_m=...)",
)
@torch.no_grad()
def magnitude_layer(
    W: torch.Tensor,
    H: torch.Tensor | None = None,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    *,
    inplace: bool = False,
) -> PruneResult:
    """Magnitude pruning: score `|W|`; unstructured prunes exactly `int(numel*sparsity)`
    weights under one threshold over the whole layer (ties broken by position); N:M per
    group. `H` is optional and only used to report the loss."""
    return run_solver(
        "magnitude", W, H, sparsity, prune_n, prune_m,
        by_score(lambda p: lambda r: p.W[r].abs(), per_row=False), needs_h=False,
        diagonal_h=True, inplace=inplace,
    )  # fmt: skip


def _select(W, H, sparsity, prune_n, prune_m, **_) -> PruneResult:
    """A composition's mask: magnitude's (the selection hook)."""
    return magnitude_layer(W, H, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m)


register(
    Method(
        "magnitude",
        magnitude_layer,
        "|W|; one threshold over the whole layer (no calibration)",
        needs_hessian=False,
        # unstructured, one threshold over the layer couples the rows; N:M is per group
        select=Selection(_select, row_separable=lambda prune_n: prune_n > 0),
    )
)
