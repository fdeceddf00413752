"""Op `obs_sweep`: SparseGPT's in-block column sweep (OBS updates), one call per block.

Contract. For a block `W1 [rows, count]` and `Hinv1 [count, count]` (upper triangular, the
block's slice of the upper Cholesky factor of `H^-1`), sweep the columns in order:

    q_i   = w_i * keep_i
    err_i = (w_i - q_i) / Hinv1[i, i]
    W1[:, j] -= err_i * Hinv1[i, j]        for j > i

Masks are keep-masks (True = kept), as everywhere at the op boundary.
- Unstructured or fixed mask (`prune_n == 0`): `keep1` is used as given (required).
- N:M (`prune_n > 0`): each group of `prune_m` columns chooses its mask when the sweep
  reaches its first column: the `prune_n` lowest `w^2 / Hinv1_jj^2` of the *updated*
  weights (a lower column wins an exact tie). An optional `keep1` marks entries that must be
  pruned whatever their score (`False`: llm-compressor's preserved zeros); they rank before
  every other entry (score -1; real scores are >= 0) and stay pruned, so a group prunes
  `max(prune_n, forced)` entries.
Returns `ObsSweep(q, err, keep, loss_rows)` in float32 (float64 if an input is float64);
`keep` is the mask used, `loss_rows = sum_i err_i^2 / 2` (the reference's OBS estimate).
Inputs are not modified.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..masks import lowest_n_along_dim0


class ObsSweep(NamedTuple):
    q: torch.Tensor  # [rows, count] the pruned, updated block
    err: torch.Tensor  # [rows, count] err_i per column (0 where kept)
    keep: torch.Tensor  # [rows, count] bool, True = kept
    loss_rows: torch.Tensor  # [rows] sum_i err_i^2 / 2


def torch_obs_sweep(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    keep1: torch.Tensor | None,
    prune_n: int = 0,
    prune_m: int = 0,
    inner: int = 16,
) -> ObsSweep:
    """Reference `obs_sweep`: columns in sub-blocks of `inner` (a multiple of `prune_m`),
    rank-1 updates inside a sub-block and one GEMM for the rest of the block (the reference's
    arithmetic up to float rounding, lighter on memory), on a transposed copy."""
    count = W1.shape[1]
    dt = torch.float64 if torch.float64 in (W1.dtype, Hinv1.dtype) else torch.float32
    Hinv1 = Hinv1.to(dt)
    WT = torch.empty(count, W1.shape[0], dtype=dt, device=W1.device)  # one column per row
    WT.copy_(W1.t())
    QT = torch.empty_like(WT)
    ET = torch.empty_like(WT)
    d = Hinv1.diagonal()
    nm = prune_n > 0
    if nm:
        forcedT = None if keep1 is None else ~keep1.t()
        pruneT = torch.zeros(WT.shape, dtype=torch.bool, device=WT.device)
        step = max(prune_m, (inner // prune_m) * prune_m)
    else:
        if keep1 is None:
            raise ValueError("keep1 is required for an unstructured or fixed-mask sweep")
        pruneT = ~keep1.t()
        step = inner
    for j1 in range(0, count, step):
        j2 = min(j1 + step, count)
        for i in range(j1, j2):
            if nm and i % prune_m == 0:
                g = WT[i : i + prune_m] ** 2 / d[i : i + prune_m, None] ** 2
                if forcedT is None:
                    pruneT[i : i + prune_m] = lowest_n_along_dim0(g, prune_n)
                else:
                    f = forcedT[i : i + prune_m]
                    pruneT[i : i + prune_m] = lowest_n_along_dim0(g.masked_fill(f, -1), prune_n) | f
            w = WT[i]
            q = w.masked_fill(pruneT[i], 0)
            err = (w - q) / d[i]
            QT[i] = q
            ET[i] = err
            if i + 1 < j2:
                WT[i + 1 : j2].addr_(Hinv1[i, i + 1 : j2], err, alpha=-1)
        if j2 < count:
            WT[j2:].addmm_(Hinv1[j1:j2, j2:].t(), ET[j1:j2], alpha=-1)
    loss_rows = (ET * ET).sum(0) / 2
    return ObsSweep(QT.t(), ET.t(), ~pruneT.t(), loss_rows)


def torch_obs_sweep_batched(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    keep1: torch.Tensor | None,
    prune_n: int = 0,
    prune_m: int = 0,
    inner: int = 16,
) -> ObsSweep:
    """`torch_obs_sweep` for a batch of independent layers at once (the experts of one MoE
    projection): `W1 [E, rows, count]`, `Hinv1 [E, count, count]`, `keep1 [E, rows, count]`;
    every output gains the leading `E`. The same sub-blocked arithmetic, with batched
    products in place of `addr_` / `addmm_`, so one Python loop serves all E layers."""
    E, rows, count = W1.shape
    dt = torch.float64 if torch.float64 in (W1.dtype, Hinv1.dtype) else torch.float32
    Hinv1 = Hinv1.to(dt)
    WT = W1.transpose(1, 2).to(dt, copy=True).contiguous()  # [E, count, rows]
    QT = torch.empty_like(WT)
    ET = torch.empty_like(WT)
    d = Hinv1.diagonal(dim1=1, dim2=2)  # [E, count]
    nm = prune_n > 0
    if nm:
        forcedT = None if keep1 is None else ~keep1.transpose(1, 2)
        pruneT = torch.zeros(WT.shape, dtype=torch.bool, device=WT.device)
        step = max(prune_m, (inner // prune_m) * prune_m)
    else:
        if keep1 is None:
            raise ValueError("keep1 is required for an unstructured or fixed-mask sweep")
        pruneT = ~keep1.transpose(1, 2)
        step = inner
    for j1 in range(0, count, step):
        j2 = min(j1 + step, count)
        for i in range(j1, j2):
            if nm and i % prune_m == 0:
                g = WT[:, i : i + prune_m] ** 2 / d[:, i : i + prune_m, None] ** 2
                if forcedT is not None:
                    f = forcedT[:, i : i + prune_m]
                    g = g.masked_fill(f, -1)
                # [E, m, rows] -> [m, E * rows]: the groups of every layer ranked at once
                low = lowest_n_along_dim0(g.transpose(0, 1).reshape(g.shape[1], -1), prune_n)
                low = low.reshape(g.shape[1], E, rows).transpose(0, 1)
                pruneT[:, i : i + prune_m] = low if forcedT is None else low | f
            w = WT[:, i]
            q = w.masked_fill(pruneT[:, i], 0)
            err = (w - q) / d[:, i, None]
            QT[:, i] = q
            ET[:, i] = err
            if i + 1 < j2:
                WT[:, i + 1 : j2].baddbmm_(Hinv1[:, i, i + 1 : j2, None], err[:, None, :], alpha=-1)
        if j2 < count:
            WT[:, j2:].baddbmm_(Hinv1[:, j1:j2, j2:].transpose(1, 2), ET[:, j1:j2], alpha=-1)
    loss_rows = (ET * ET).sum(1) / 2
    return ObsSweep(QT.transpose(1, 2), ET.transpose(1, 2), ~pruneT.transpose(1, 2), loss_rows)
