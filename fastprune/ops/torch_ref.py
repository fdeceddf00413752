"""Pure-PyTorch reference ops: the truth every Triton/CUDA kernel is tested against.

Each function runs on any device and in float32 or float64; the fused kernels implement the
same contracts (`triton_obs_sweep` vs `torch_obs_sweep`, ...).
"""

from __future__ import annotations

import torch

from ..masks import lowest_n_along_dim0, nm_prune_mask, threshold_prune_mask

# ----------------------------------------------------------------------------- OBS sweep


def torch_block_prune_mask(W1: torch.Tensor, hinv_diag: torch.Tensor, sparsity: float):
    """SparseGPT's unstructured block mask: prune `w^2 / Hinv_jj^2 <= sorted[int(numel*s)]`."""
    return threshold_prune_mask(W1**2 / hinv_diag.reshape(1, -1) ** 2, sparsity)


def torch_obs_sweep(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    prune1: torch.Tensor | None,
    prune_n: int = 0,
    prune_m: int = 0,
    inner: int = 16,
):
    """SparseGPT's in-block column sweep (OBS updates) for one block of columns.

    For each column i of the block: `q = w * keep`, `err = (w - q) / Hinv_ii`,
    `W1[:, i:] -= err (x) Hinv1[i, i:]`. With `prune_n > 0` the mask of every group of
    `prune_m` columns is chosen when the sweep reaches the group's first column, from the
    updated weights (`prune_n` lowest `w^2 / Hinv_jj^2`); otherwise `prune1` (True = pruned)
    is used as given. Columns are swept in sub-blocks of `inner` (a multiple of `prune_m`):
    rank-1 updates inside a sub-block, one GEMM for the rest of the block, which is the same
    arithmetic as the reference up to float rounding and much lighter on memory.

    Args: W1 `[rows, count]`, Hinv1 `[count, count]` upper triangular (same dtype).
    Returns: `(Q1, Err1, prune1, loss_rows)`; `loss_rows = sum_i err_i^2 / 2` per row (the
    reference's OBS loss estimate). W1 is not modified.
    """
    count = W1.shape[1]
    WT = W1.t().contiguous().clone()  # [count, rows]: one column per contiguous row
    QT = torch.empty_like(WT)
    ET = torch.empty_like(WT)
    d = Hinv1.diagonal()
    nm = prune_n > 0
    if nm:
        pruneT = torch.zeros(WT.shape, dtype=torch.bool, device=WT.device)
        step = max(prune_m, (inner // prune_m) * prune_m)
    else:
        if prune1 is None:
            raise ValueError("prune1 is required for an unstructured or fixed-mask sweep")
        pruneT = prune1.t()
        step = inner
    for j1 in range(0, count, step):
        j2 = min(j1 + step, count)
        for i in range(j1, j2):
            if nm and i % prune_m == 0:
                g = WT[i : i + prune_m] ** 2 / d[i : i + prune_m, None] ** 2
                pruneT[i : i + prune_m] = lowest_n_along_dim0(g, prune_n)
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
    return QT.t(), ET.t(), pruneT.t(), loss_rows


# ------------------------------------------------------------------------ ROSE losses


def torch_column_losses(
    S: torch.Tensor,
    bounds: list[tuple[int, int]],
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
):
    """ROSE's pre-pruning losses.

    Unstructured: in each block `[i1, i2)` the entries with `S <= sorted(S_block)[int(numel*s)]`
    are pre-pruned; N:M: the `prune_n` lowest of each group (blocks are the groups). The loss
    matrix is `L = S` where pre-pruned, else 0. Returns `(column_loss [cols],
    block_loss [nblocks])`, column sums and block sums of `L`.
    """
    if prune_n:
        L = S * nm_prune_mask(S, prune_n, prune_m)
        col = L.sum(0)
        return col, col.reshape(-1, prune_m).sum(1)
    col = torch.empty(S.shape[1], dtype=S.dtype, device=S.device)
    blocks = torch.empty(len(bounds), dtype=S.dtype, device=S.device)
    for b, (i1, i2) in enumerate(bounds):
        Sb = S[:, i1:i2]
        Lb = Sb * threshold_prune_mask(Sb, sparsity)
        col[i1:i2] = Lb.sum(0)
        blocks[b] = Lb.sum()
    return col, blocks


# ------------------------------------------------------------------------ swap search

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
):
    """Best 1-swap per row: un-prune p, prune u, minimising

    `Δ = w_u^2 H_uu + w_p^2 H_pp - 2 w_u w_p H_up + 2 w_u c_u - 2 w_p c_p`

    over kept u and pruned p of the row (N:M: u and p in one group). `c = H r` with
    `r = w * ~keep`. Chunked over rows and u so no `[rows, cols, cols]` tensor exists.
    Returns `(u, p, delta)` per row; `delta = +inf` where a row has no candidate pair.
    `rows` (optional) searches only those rows, results in that order.
    """
    if rows is not None:
        w, keep, c = w[rows], keep[rows], c[rows]
    rows, cols = w.shape
    hdiag = H.diagonal()
    a, b = _swap_terms(w, keep, c, hdiag)
    wk = w * keep
    wp = w * ~keep
    if prune_n:
        return _swap_search_nm(a, b, wk, wp, H, prune_m)
    if w.device.type == "cpu" and cols >= _ROWWISE_MIN_COLS:
        return _swap_search_rowwise(a, b, w, keep, H)
    return _swap_search_dense(a, b, wk, wp, H)


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


def torch_swap_apply(
    w: torch.Tensor,
    keep: torch.Tensor,
    c: torch.Tensor,
    H: torch.Tensor,
    rows: torch.Tensor,
    u: torch.Tensor,
    p: torch.Tensor,
) -> None:
    """Apply the chosen swaps in place for `rows`: prune u, un-prune p, and
    `c += w_u H[:, u] - w_p H[:, p]` (H symmetric, so rows of H are gathered)."""
    if rows.numel() == 0:
        return
    wu = w[rows, u]
    wpv = w[rows, p]
    keep[rows, u] = False
    keep[rows, p] = True
    c[rows] += wu[:, None] * H[u] - wpv[:, None] * H[p]
