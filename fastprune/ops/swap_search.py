"""Op `swap_search`: SparseSwaps' best 1-swap of every searched row.

Contract. For rows `w [rows, cols]` with keep-mask `keep` (True = kept), pruned residual
`r = w * ~keep` and `c = r @ H` (`H [cols, cols]` symmetric), pruning a kept `u` and
un-pruning a pruned `p` changes the row's loss `r^T H r` by

    Δ(u, p) = w_u^2 H_uu + w_p^2 H_pp - 2 w_u w_p H_up + 2 w_u c_u - 2 w_p c_p

Returns `SwapSearch(u, p, delta)` per searched row: the pair minimising Δ over kept u and
pruned p of the row (N:M, `prune_n > 0`: u and p inside one group of `prune_m` columns);
`delta = +inf` where a row has no candidate pair. `rows` (optional int64 indices) searches
only those rows of the full tensors, results in that order. Nothing is modified. Never
materialises a `[rows, cols, cols]` tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SwapSearch(NamedTuple):
    u: torch.Tensor  # [n] int64: the kept column to prune
    p: torch.Tensor  # [n] int64: the pruned column to keep
    delta: torch.Tensor  # [n] the change of the row's loss (+inf: no candidate)


_PAIR_BUDGET = 1 << 20  # elements of one [rows, u, p] chunk of candidate swaps
_ROWWISE_MIN_COLS = 256  # CPU: from this width the per-row compacted search is faster


def _swap_terms(w, keep, c, hdiag):
    """Per-entry parts of Δ: a_u for kept u, b_p for pruned p (+inf where not a candidate)."""
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    a = torch.where(keep, w * w * hdiag + 2 * w * c, inf)
    b = torch.where(keep, inf, w * w * hdiag - 2 * w * c)
    return a, b


def torch_swap_search(
    w: torch.Tensor,
    keep: torch.Tensor,
    c: torch.Tensor,
    H: torch.Tensor,
    prune_n: int = 0,
    prune_m: int = 0,
    rows: torch.Tensor | None = None,
) -> SwapSearch:
    """Reference `swap_search`: chunked over rows and u on a GPU, per row over only its kept
    x pruned pairs on CPU (where a row loop is cheap and memory traffic dominates)."""
    if rows is not None:
        w, keep, c = w[rows], keep[rows], c[rows]
    rows, cols = w.shape
    hdiag = H.diagonal()
    a, b = _swap_terms(w, keep, c, hdiag)
    wk = w * keep
    wp = w * ~keep
    if prune_n:
        return SwapSearch(*_swap_search_nm(a, b, wk, wp, H, prune_m))
    if w.device.type == "cpu" and cols >= _ROWWISE_MIN_COLS:
        return SwapSearch(*_swap_search_rowwise(a, b, w, keep, H))
    return SwapSearch(*_swap_search_dense(a, b, wk, wp, H))


def _swap_search_dense(a, b, wk, wp, H):
    """All (u, p) of a chunk of rows at once; candidates outside kept x pruned are +inf."""
    rows, cols = a.shape
    best = torch.full((rows,), float("inf"), dtype=a.dtype, device=a.device)
    best_u = torch.zeros(rows, dtype=torch.long, device=a.device)
    best_p = torch.zeros(rows, dtype=torch.long, device=a.device)
    tile_u = max(1, min(cols, _PAIR_BUDGET // cols))
    tile_r = max(1, _PAIR_BUDGET // (tile_u * cols))
    for r0 in range(0, rows, tile_r):
        r1 = min(rows, r0 + tile_r)
        for u0 in range(0, cols, tile_u):
            u1 = min(cols, u0 + tile_u)
            # D[r, u, p] = a_u + b_p - 2 w_u H_up w_p, built in place in one buffer
            D = H[None, u0:u1, :] * wp[r0:r1, None, :]
            D.mul_(wk[r0:r1, u0:u1, None] * -2)
            D.add_(b[r0:r1, None, :]).add_(a[r0:r1, u0:u1, None])
            val, idx = D.reshape(r1 - r0, -1).min(dim=1)
            better = val < best[r0:r1]
            best[r0:r1] = torch.where(better, val, best[r0:r1])
            best_u[r0:r1] = torch.where(better, u0 + idx // cols, best_u[r0:r1])
            best_p[r0:r1] = torch.where(better, idx % cols, best_p[r0:r1])
    return best_u, best_p, best


def _swap_search_rowwise(a, b, w, keep, H):
    """Row by row over only the row's kept u x pruned p (a quarter of all pairs at 50%):
    the CPU path, where a per-row loop costs little and memory traffic dominates."""
    rows, cols = a.shape
    best = torch.full((rows,), float("inf"), dtype=w.dtype, device=w.device)
    best_u = torch.zeros(rows, dtype=torch.long, device=w.device)
    best_p = torch.zeros(rows, dtype=torch.long, device=w.device)
    for r in range(rows):
        ku = keep[r].nonzero().flatten()
        pp = (~keep[r]).nonzero().flatten()
        nk, npr = ku.numel(), pp.numel()
        if nk == 0 or npr == 0:
            continue
        x = -2 * w[r, ku]
        y = w[r, pp]
        au = a[r, ku]
        bp = b[r, pp]
        step = max(1, _PAIR_BUDGET // npr)
        vals, idxs = [], []
        for k0 in range(0, nk, step):
            k1 = min(nk, k0 + step)
            # D[u, p] = a_u + b_p - 2 w_u H_up w_p over this row's candidates only
            D = H.index_select(0, ku[k0:k1]).index_select(1, pp)
            D.mul_(y).mul_(x[k0:k1, None]).add_(bp).add_(au[k0:k1, None])
            v, i = D.reshape(-1).min(0)
            vals.append(v)
            idxs.append(i + k0 * npr)
        j = int(torch.stack(vals).argmin()) if len(vals) > 1 else 0
        best[r] = vals[j]
        best_u[r] = ku[idxs[j] // npr]
        best_p[r] = pp[idxs[j] % npr]
    return best_u, best_p, best


def _swap_search_nm(a, b, wk, wp, H, m):
    rows, cols = a.shape
    G = cols // m
    Hb = H.reshape(G, m, G, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, m, m] blocks
    best = torch.empty(rows, dtype=a.dtype, device=a.device)
    best_u = torch.empty(rows, dtype=torch.long, device=a.device)
    best_p = torch.empty(rows, dtype=torch.long, device=a.device)
    tile_r = max(1, _PAIR_BUDGET // (cols * m))
    for r0 in range(0, rows, tile_r):
        r1 = min(rows, r0 + tile_r)
        R = r1 - r0
        ak = a[r0:r1].reshape(R, G, m, 1)
        bp = b[r0:r1].reshape(R, G, 1, m)
        cross = wk[r0:r1].reshape(R, G, m, 1) * Hb[None] * wp[r0:r1].reshape(R, G, 1, m)
        D = (ak + bp - 2 * cross).reshape(R, -1)
        val, idx = D.min(dim=1)
        g = idx // (m * m)
        best[r0:r1] = val
        best_u[r0:r1] = g * m + (idx % (m * m)) // m
        best_p[r0:r1] = g * m + idx % m
    return best_u, best_p, best
