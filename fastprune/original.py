"""Plain re-statements of the research code's loops, used as oracles by tests and benchmarks.

These follow the published SparseGPT (`fasterprune`), ROSE and Wanda scripts step for step,
one small tensor op per column as they do, so that fastprune's solvers can be checked for
the same result and timed against the original cost. They are deliberately not optimised.
Masks returned here are True = pruned, as in those scripts.
"""

from __future__ import annotations

import torch


def original_sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    widths: list[int] | None = None,
):
    """The IST-DASLab `SparseGPT.fasterprune` loop (no quantizer). Returns (W, pruned).

    `widths`: the block widths in sweep order instead of `blocksize` each (not in the
    original; an oracle for sweeps whose blocks differ in size, as a reordered ROSE layer's).
    """
    W = W.clone().float()
    H = H.clone().float()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(cols, device=W.device)
    H[idx, idx] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
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
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, pruned


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
