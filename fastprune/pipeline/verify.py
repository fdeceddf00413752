"""Measured sparsity of a pruned model against its `PruneReport`."""

from __future__ import annotations

import torch

from ..layers import get_weight
from ..masks import check_nm_keep_mask
from ..models import find_blocks
from .block_layers import resolve_layer
from .report import PruneReport


@torch.no_grad()
def check_model_sparsity(model, report: PruneReport, blocks: str | None = None) -> dict:
    """Measured zeros of every layer in `report` (and the N:M pattern where one was asked);
    raises `AssertionError`-free `ValueError` naming the first layer that is off."""
    path, block_list = find_blocks(model, blocks or report.totals.get("blocks_path"))
    n, m = report_pattern(report)
    zeros = total = 0
    for lr in report.layers:
        z, size = check_layer_sparsity(block_list[lr.block], lr, path, n, m)
        zeros += z
        total += size
    return {"zeros": zeros, "params": total, "sparsity": zeros / max(1, total)}


def report_pattern(report: PruneReport) -> tuple[int, int]:
    """(prune_n, prune_m) of a report's pattern ("2:4"; (0, 0) unstructured)."""
    pat = report.pattern
    n, m = (int(v) for v in pat.split(":")) if ":" in pat else (0, 0)
    return n, m


def check_layer_sparsity(block, lr, path: str, n: int, m: int) -> tuple[int, int]:
    """(zeros, entries) of the weight of report row `lr` in `block`; a `ValueError` naming
    it when it holds fewer zeros than were pruned or breaks the `n:m` pattern."""
    W = get_weight(resolve_layer(block, lr.name.split(".", 1)[1]))
    z = W.numel() - torch.count_nonzero(W).item()
    expected = round(lr.sparsity * W.numel())
    if z < expected:
        raise ValueError(f"{path}.{lr.name}: {z} zeros, expected at least {expected}")
    if n and not check_nm_keep_mask(W != 0, n, m) and not _nm_at_least(W, n, m):
        raise ValueError(f"{path}.{lr.name} does not follow the {n}:{m} pattern")
    return z, W.numel()


def _nm_at_least(W: torch.Tensor, n: int, m: int) -> bool:
    """Every group of m inputs has at least n zeros (a kept weight may be exactly 0)."""
    rows, cols = W.shape
    return bool(((W == 0).reshape(rows, cols // m, m).sum(-1) >= n).all())
