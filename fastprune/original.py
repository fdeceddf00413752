"""Plain re-statements of the research code's loops, used as oracles by tests and benchmarks.

These follow the published SparseGPT (`fasterprune`), GPTQ (`fasterquant`), ROSE and Wanda
scripts step for step, one small tensor op per column as they do, so that fastprune's
solvers can be checked for the same result and timed against the original cost. They are
deliberately not optimised. Masks returned here are True = pruned, as in those scripts.
"""

from __future__ import annotations

import torch


def _zero_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> None:
    """Both scripts' dead-input step, in place: an input that is always zero gets `H_jj = 1`
    and its weights are zeroed."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0


def _damped_inverse_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Both scripts' `Hinv`: `percdamp * mean(diag H)` added to the diagonal (in place), then
    the upper Cholesky factor of the inverse, via Cholesky and `cholesky_inverse`."""
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    H = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(H, upper=True)


def original_sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    widths: list[int] | None = None,
    wbits: int = 16,
    dtype: torch.dtype = torch.float32,
):
    """The IST-DASLab `SparseGPT.fasterprune` loop. Returns (W, pruned).

    `widths`: the block widths in sweep order instead of `blocksize` each (not in the
    original; an oracle for sweeps whose blocks differ in size, as a reordered ROSE layer's).
    `wbits` < 16: its joint quantization (`--wbits`): one asymmetric grid per row found from
    W before the sweep, every weight rounded to it after pruning (a pruned one to exactly 0).
    `dtype`: the arithmetic (the original's is float32; float64 makes an exact oracle).
    """
    W = W.clone().to(dtype)
    grid = original_find_params(W, wbits, sym=False) if wbits < 16 else None
    H = H.clone().to(dtype)
    rows, cols = W.shape
    _zero_dead_inputs(W, H)
    Hinv = _damped_inverse_factor(H, percdamp)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    if widths is None:
        widths = [min(blocksize, cols - i1) for i1 in range(0, cols, blocksize)]
    assert sum(widths) == cols
    i2 = 0
    for count in widths:
        i1, i2 = i2, i2 + count
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = (
                    W1[:, i : (i + prunem)] ** 2
                    / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                )
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            if grid is not None:
                q = original_quantize(q.unsqueeze(1), *grid, 2**wbits - 1).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, pruned


def original_find_params(x: torch.Tensor, bits: int, sym: bool):
    """GPTQ's `Quantizer.find_params(x, weight=True)` (per channel, no MSE search): each
    row's `(scale, zero)` as `[rows, 1]` columns."""
    maxq = torch.tensor(2**bits - 1)
    tmp = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1)


def original_quantize(x, scale, zero, maxq):
    """GPTQ's `quantize`: round to the grid."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def original_gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    groupsize: int = -1,
    sym: bool = True,
    actorder: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    dtype: torch.dtype = torch.float32,
):
    """The IST-DASLab `GPTQ.fasterquant` loop (static_groups=False, no MSE grid search).
    Returns (Q, scale, zero, g_idx): the grids `[rows, n_groups]` in the order the sweep
    found them, and each column's group (as the GPTQ-for-LLaMa packers record it).

    A group's grid comes from `W` when the sweep reaches its first column: the block's own
    updates of earlier columns are not in `W` yet (they are only in its working copy).
    `dtype`: the arithmetic (the original's is float32; float64 makes an exact oracle).
    """
    W = W.clone().to(dtype)
    rows, cols = W.shape
    maxq = 2**bits - 1
    grid = original_find_params(W, bits, sym)  # the per-channel grid (replaced by groups)
    grids = [grid] if groupsize == -1 else []
    H = H.clone().to(dtype)
    _zero_dead_inputs(W, H)
    perm = torch.arange(cols, device=W.device)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv = _damped_inverse_factor(H, percdamp)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                grid = original_find_params(W[:, (i1 + i) : (i1 + i + groupsize)], bits, sym)
                grids.append(grid)
            q = original_quantize(w.unsqueeze(1), *grid, maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    invperm = torch.argsort(perm)
    g = torch.arange(cols, device=W.device) // (groupsize if groupsize != -1 else cols)
    scale = torch.cat([s for s, _ in grids], 1)
    zero = torch.cat([z for _, z in grids], 1)
    return Q[:, invperm], scale, zero, g[invperm]


def _rose_block_losses(score, cols, blocksize, sparsity):
    reorder, losses = [], []
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        tmp = score[:, i1:i2].clone()
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        prune_score = tmp * (tmp <= thresh)
        order = torch.sort(prune_score.sum(0), descending=True, stable=True).indices
        reorder.append(i1 + order)
        losses.append(torch.sum(prune_score).item())
    return torch.cat(reorder), torch.tensor(losses, device=score.device)


def original_rose(
    W: torch.Tensor,
    H: torch.Tensor,
    scaler_row: torch.Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
):
    """The ROSE repository's `fasterprune` (its scaler passed in), returning (W, pruned, ste).

    Argsorts are stable here (the original's are not, which only matters at exact ties).
    Raises NotImplementedError where the original crashes: N:M on a columnar layer (its
    column order is undefined there) and a reordered layer whose last block is partial.
    """
    rows, cols = W.shape
    if prune_m != 0:
        blocksize = prune_m
    W = W.clone().float()
    score = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    if prune_n != 0:
        low = torch.zeros_like(score, dtype=torch.bool)
        for ii in range(0, cols, prune_m):
            tmp = score[:, ii : (ii + prune_m)].float()
            low.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
        block_loss = (score * low).view(rows, cols // prune_m, prune_m).sum(dim=2).sum(dim=0)
        reorder_column = None
    else:
        reorder_column, block_loss = _rose_block_losses(score, cols, blocksize, sparsity)
    ste = ((torch.max(block_loss) - torch.min(block_loss)) / torch.max(block_loss)).item()
    if ste > 0.5:
        if reorder_column is None:
            raise NotImplementedError("the original ROSE crashes here (N:M, columnar layer)")
        if cols % blocksize:
            raise NotImplementedError("the original ROSE crashes here (partial last block)")
        order = torch.sort(block_loss, descending=True, stable=True).indices
        group = torch.cat([torch.arange(b * blocksize, (b + 1) * blocksize) for b in order])
        perm = reorder_column[group.to(W.device)]
    else:
        perm = torch.arange(cols, device=W.device)
    Hp = H[perm][:, perm]
    Wq, pruned = original_sparsegpt(W[:, perm], Hp, sparsity, prune_n, prune_m, blocksize, percdamp)
    inv = torch.argsort(perm)
    return Wq[:, inv], pruned[:, inv], ste


def original_wanda(
    W: torch.Tensor, scaler_row: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
):
    """Wanda's `prune_wanda` selection for one layer. Returns (W, pruned)."""
    metric = torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))
    pruned = torch.zeros_like(metric) == 1
    if prune_n != 0:
        for ii in range(metric.shape[1]):
            if ii % prune_m == 0:
                tmp = metric[:, ii : (ii + prune_m)].float()
                pruned.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
        pruned.scatter_(1, idx, True)
    out = W.clone()
    out[pruned] = 0
    return out, pruned
