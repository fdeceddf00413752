"""Mask selection helpers shared by the score methods and the solvers.

Convention inside fastprune: functions named `*_prune_mask` return True = pruned (as the
research code computes them); public results carry keep-masks (True = kept).
"""

from __future__ import annotations

import torch


def nm_prune_mask(score: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """True where a weight is among the `prune_n` lowest scores of its group of `prune_m`.

    Groups are `prune_m` consecutive columns of each row; the lowest are found per group as
    Wanda/SparseGPT's `topk(largest=False)` does, but by a stable sort, so that a lower
    column wins an exact tie on every device (topk's order among ties is unspecified).
    """
    rows, cols = score.shape
    g = score.reshape(rows, cols // prune_m, prune_m)
    idx = torch.sort(g, dim=-1, stable=True).indices[..., :prune_n]
    pruned = torch.zeros_like(g, dtype=torch.bool)
    pruned.scatter_(-1, idx, True)
    return pruned.reshape(rows, cols)


def lowest_n_along_dim0(score: torch.Tensor, n: int) -> torch.Tensor:
    """True for the `n` lowest entries of each column of `score [m, rows]` (ties: lower index
    first), by ranking: cheaper than topk on a short, strided dimension."""
    a, b = score[None, :, :], score[:, None, :]  # a[k] vs b[j]
    m = score.shape[0]
    earlier = torch.ones(m, m, dtype=torch.bool, device=score.device).tril(-1)[:, :, None]
    rank = ((a < b) | ((a == b) & earlier)).sum(1)
    return rank < n


def row_prune_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the `int(cols * sparsity)` lowest scores of each row, ties taken by
    position: exactly the first `k` of Wanda's stable sort. On a GPU by that sort; on the
    CPU by a selection (kthvalue: each row's k-th lowest `t`; every score below `t`, then
    the first of those equal to `t` by position), cheaper than sorting there."""
    rows, cols = score.shape
    k = int(cols * sparsity)
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if score.is_cuda:
        pruned = torch.zeros_like(score, dtype=torch.bool)
        idx = torch.sort(score, dim=-1, stable=True).indices[:, :k]
        return pruned.scatter_(1, idx, True)
    t = torch.kthvalue(score, k, dim=1, keepdim=True).values
    pruned = score < t
    tied = score == t
    need = k - pruned.sum(1)  # >= 1: t itself is among the k lowest
    crowded = (tied.sum(1) > need).nonzero().squeeze(1)  # rows with more ties than room
    if crowded.numel():
        first = tied[crowded]
        first &= first.cumsum(1) <= need[crowded, None]
        tied[crowded] = first
    return pruned.logical_or_(tied)


def global_prune_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for exactly `int(numel * sparsity)` lowest scores over the whole tensor.

    One threshold over the layer; ties at the threshold are broken by position (stable sort),
    so the sparsity is exact.
    """
    k = int(score.numel() * sparsity)
    pruned = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        idx = torch.sort(score.flatten(), stable=True).indices[:k]
        pruned[idx] = True
    return pruned.reshape(score.shape)


def threshold_prune_mask(score: torch.Tensor, sparsity: float, start_dim: int = 0) -> torch.Tensor:
    """SparseGPT/ROSE's per-block rule: prune `score <= sorted(score)[int(numel * sparsity)]`.

    Note the `<=`: without ties this prunes `int(numel * sparsity) + 1` entries, exactly as
    the reference does. On the CPU a selection (kthvalue) finds the value; on a GPU a full
    sort, which is faster there (benchmarks/bench_block_prune_mask.py times this mask).
    `start_dim`: the dims before it index independent blocks, each with its own threshold
    (a batch of layers' blocks).
    """
    flat = score.flatten(start_dim)
    k = int(flat.shape[-1] * sparsity)
    if flat.is_cuda:
        thresh = torch.sort(flat, dim=-1).values[..., k]
    else:
        thresh = torch.kthvalue(flat, k + 1, dim=-1).values
    return score <= thresh.reshape(thresh.shape + (1,) * (score.dim() - start_dim))


def selection_prune_mask(
    score: torch.Tensor, sparsity: float, prune_n: int, prune_m: int, per_row: bool = True
) -> torch.Tensor:
    """Score-based selection: N:M per group, else per row (Wanda) or global (magnitude)."""
    if prune_n:
        return nm_prune_mask(score, prune_n, prune_m)
    if per_row:
        return row_prune_mask(score, sparsity)
    return global_prune_mask(score, sparsity)


def pruned_fraction(keep: torch.Tensor) -> float:
    """The fraction of a keep-mask's entries that are pruned (False), counted without a
    float copy of the mask."""
    return 1.0 - torch.count_nonzero(keep).item() / max(1, keep.numel())


def pattern_name(prune_n: int, prune_m: int) -> str:
    return f"{prune_n}:{prune_m}" if prune_n else "unstructured"


def check_nm_keep_mask(keep: torch.Tensor, prune_n: int, prune_m: int) -> bool:
    """True when every group of `prune_m` columns of every row has exactly `prune_n` pruned."""
    rows, cols = keep.shape
    if cols % prune_m:
        return False
    pruned = (~keep).reshape(rows, cols // prune_m, prune_m).sum(-1)
    return bool((pruned == prune_n).all())
