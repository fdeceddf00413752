"""An ADMM mask selection in ALPS's manner, then the least-squares refit on its mask: a lever
the quality benchmark measures against fastprune's recipe (registered there as method "admm",
not part of the package's methods).

Per layer, `min (W - W0) Hd (W - W0)^T` subject to the pattern (per row `int(cols*sparsity)`
zeros, or N of every M) is split as `W = D` with `D` in the pattern:

    W <- (W0 Hd - V + rho D) (Hd + rho I)^-1      (one eigendecomposition of Hd per layer)
    D <- the pattern's largest |W + V/rho|          (per row, or per group of M)
    V <- V + rho (W - D)

`rho` (relative to mean(diag Hd)) starts small, so `W` first moves toward the dense optimum,
and grows each iteration, faster while the support still changes (the shape of ALPS's
schedule, slower: x(1 + 3 growth) when more than 10% of the kept entries moved, x(1 + 2
growth) above 0.5%, else x(1 + growth)), until the support has not changed for `patience`
iterations at `rho >= 1` or `iters` are spent. The final support
is the mask; the weights are `fastprune`'s least-squares refit on it (ALPS's PCG step).
"""

from __future__ import annotations

import time

import torch

from fastprune.hessian import DEFAULT_PERCDAMP, layer_loss
from fastprune.masks import pruned_fraction, selection_prune_mask
from fastprune.result import PruneResult
from fastprune.solvers.refit import damped_hessian, refit_masked


def pattern_support(Z: torch.Tensor, sparsity: float, prune_n: int, prune_m: int) -> torch.Tensor:
    """Keep-mask of the largest `|Z|`: per row all but `int(cols*sparsity)`, or per group of
    `prune_m` all but `prune_n` (Wanda's selection rule on the score `|Z|`)."""
    return ~selection_prune_mask(Z.abs(), sparsity, prune_n, prune_m, per_row=True)


@torch.no_grad()
def admm_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    *,
    percdamp: float = DEFAULT_PERCDAMP,
    iters: int = 300,
    rho: float = 0.01,
    patience: int = 5,
    growth: float = 0.03,
    refit_iters: int = 32,
) -> PruneResult:
    """The ADMM mask (module docstring) with the least-squares refit on it; `info`:
    `admm_iters`, `admm_rho` (final, relative), `admm_changed` (support entries that moved
    in the last iteration) and the refit's counters."""
    t0 = time.perf_counter()
    if prune_n and W.shape[1] % prune_m:
        raise ValueError(f"W's {W.shape[1]} columns are not a multiple of prune_m={prune_m}")
    Hd, dead = damped_hessian(H, percdamp)
    dt = Hd.dtype
    scale = Hd.diagonal().mean()
    evals, Q = torch.linalg.eigh(Hd / scale)
    w0 = W.to(dt).masked_fill(dead, 0.0)
    target = w0 @ (Hd / scale)  # W0 Hd, in the relative scale of rho
    D = w0 * pattern_support(w0, sparsity, prune_n, prune_m)
    V = torch.zeros_like(w0)
    keep = D != 0
    kept = max(1, int(keep.sum()))
    r, still, done, changed = float(rho), 0, 0, 0
    while done < iters:
        done += 1
        X = ((target - V + r * D) @ Q) / (evals + r)
        X = X @ Q.T
        Z = X + V / r
        new = pattern_support(Z, sparsity, prune_n, prune_m)
        D = Z * new
        V = V + r * (X - D)
        changed = int((new != keep).sum()) // 2
        keep = new
        still = still + 1 if changed == 0 else 0
        if still >= patience and r >= 1.0:
            break
        r *= 1 + growth * (3 if changed > 0.1 * kept else 2 if changed > 0.005 * kept else 1)
    weight, info = refit_masked(W, H, keep, D.to(W.dtype), percdamp=percdamp, iters=refit_iters)
    info.update(admm_iters=done, admm_rho=r, admm_changed=changed, method="admm")
    info["achieved_sparsity"] = pruned_fraction(keep)
    info["seconds"] = time.perf_counter() - t0
    return PruneResult(weight, keep, layer_loss(W, weight, H), info)


def register_admm() -> None:
    """Method "admm" (`admm_layer`) in the pipeline, once."""
    import fastprune as fp
    from fastprune.solvers.registry import Method, register, solver_defaults

    if "admm" not in fp.METHODS:
        register(
            Method(
                "admm",
                admm_layer,
                "ADMM mask selection (ALPS's manner) with the least-squares refit",
                solver_defaults(admm_layer, "percdamp", "refit_iters"),
                row_separable=lambda n, o: True,
            )
        )
