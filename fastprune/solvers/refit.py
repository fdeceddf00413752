"""The exact least-squares weights on a fixed mask: per row `w`, the minimiser of
`(w - w0) Hd (w - w0)^T` over the kept entries with the pruned ones at zero, where
`Hd = H + percdamp * mean(diag H) * I` is the damped Hessian that SparseGPT's OBS update
also uses (the damping pulls the result toward `w0`).

SparseGPT's update reaches this optimum only for the last column it prunes: the columns it
has passed are frozen, so on the same mask its weights leave error the kept weights could
still absorb. Setting the gradient on the kept entries to zero gives, per row,
`(Hd)_KK w_K = (w0 Hd)_K`, a different system for every row (each has its own kept set
`K`). All rows are solved together by preconditioned conjugate gradients on
`A p = mask * (p @ Hd)` (one GEMM of the layer's size per iteration, Jacobi preconditioner
`1 / diag(Hd)`), warm-started from given weights (the OBS result); each row keeps the lower
of its start and its solution under `Hd`, so the refit never raises a row's damped loss.
"""

from __future__ import annotations

import torch

from ..hessian import DEFAULT_PERCDAMP, row_losses
from ..validation import check_int, check_percdamp


def damped_hessian(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`Hd`, dead): `H` in float32 at least with dead columns (zero diagonal: inputs that
    are always zero) set to 1 on the diagonal and `percdamp * mean(diag H)` added to it, as
    SparseGPT damps; `dead` flags those columns."""
    Hd = H.to(torch.promote_types(H.dtype, torch.float32)).clone()
    diag = Hd.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean()
    return Hd, dead


@torch.no_grad()
def refit_masked(
    W: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor | None = None,
    *,
    percdamp: float = DEFAULT_PERCDAMP,
    iters: int = 32,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, dict]:
    """Least-squares weights for `W` (rows x cols) on the keep-mask `mask` (True = kept, as
    results carry it) under `H` (cols x cols), by batched PCG from `start` (default `W` with
    the mask applied); stops after `iters` iterations or when every row's residual is below
    `tol` times its initial one. A row whose iterate is not finite keeps its start. Returns
    (weights in `W`'s dtype with the pruned entries zero, info: `refit_iters`,
    `refit_residual` (the largest relative residual left), `refit_rows_kept_start`)."""
    percdamp = check_percdamp(percdamp)
    iters = check_int(iters, "iters", minimum=0)
    if mask.shape != W.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of W's shape {tuple(W.shape)}")
    if start is not None and start.shape != W.shape:
        raise ValueError(f"start must have W's shape {tuple(W.shape)}; got {tuple(start.shape)}")
    Hd, dead = damped_hessian(H, percdamp)
    dt = Hd.dtype
    keep = mask.to(dt)
    w0 = W.to(dt).masked_fill(dead, 0.0)  # SparseGPT zeroes the weights of dead inputs
    x = (w0 if start is None else start.to(dt)) * keep
    x0 = x
    prec = 1.0 / Hd.diagonal()
    r = -((x - w0) @ Hd) * keep  # minus the gradient on the kept entries
    r0 = r.norm(dim=1)
    z = r * prec
    p = z
    rz = (r * z).sum(1)
    done = 0
    worst = 0.0
    while done < iters:
        done += 1
        Ap = (p @ Hd) * keep
        pAp = (p * Ap).sum(1)
        alpha = torch.where(pAp > 0, rz / pAp.clamp_min(torch.finfo(dt).tiny), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        rel = r.norm(dim=1) / r0.clamp_min(torch.finfo(dt).tiny)
        worst = float(rel.max()) if rel.numel() else 0.0
        if worst <= tol:
            break
        z = r * prec
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(torch.finfo(dt).tiny), 0.0)
        p = z + beta[:, None] * p
        rz = rz_new
    better = row_losses(w0, x, Hd) <= row_losses(w0, x0, Hd)
    x = torch.where(better[:, None], x, x0) * keep
    info = {
        "refit_iters": done,
        "refit_residual": worst,
        "refit_rows_kept_start": int((~better).sum()),
    }
    return x.to(W.dtype), info
