"""SparseGPT (IST-DASLab `fasterprune`) as a layer-level solver, and the OBS block loop that
ROSE shares. Only the ops (block mask, in-block sweep) differ between backends."""

from __future__ import annotations

import time

import torch

from . import ops
from .hessian import InverseHessian, inverse_hessian, layer_loss
from .masks import check_nm_keep_mask, pattern_name
from .result import PruneResult
from .validation import (
    check_backend,
    check_hessian,
    check_int,
    check_mask,
    check_pattern,
    check_percdamp,
    check_sparsity,
    check_weight,
    compute_dtype,
)

OBS_OPS = ("block_prune_mask", "obs_sweep")


def block_bounds(cols: int, blocksize: int) -> list[tuple[int, int]]:
    """`[(i1, i2), ...]` blocks of `blocksize` columns; the last one may be shorter."""
    return [(i1, min(i1 + blocksize, cols)) for i1 in range(0, cols, blocksize)]


def nm_blocksize(blocksize: int, prune_m: int) -> int:
    """Round the sweep's block down to a multiple of M so no N:M group straddles two blocks."""
    if not prune_m:
        return blocksize
    return max(prune_m, (blocksize // prune_m) * prune_m)


@torch.no_grad()
def obs_prune(
    W: torch.Tensor,
    hinv: torch.Tensor,
    bounds: list[tuple[int, int]],
    sparsity: float,
    prune_n: int,
    prune_m: int,
    fixed_pruned: torch.Tensor | None,
    backend: str,
):
    """The SparseGPT block loop over `bounds` on a float32/64 working copy `W` (modified).

    Per block: choose the mask (fixed, by threshold, or N:M inside the sweep), sweep the
    block's columns with OBS updates, write the pruned block, then the trailing GEMM
    `W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]`. Returns `(W, pruned, obs_loss_rows)`.
    """
    block_mask = ops.get_op("block_prune_mask", backend)
    sweep = ops.get_op("obs_sweep", backend)
    rows, cols = W.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    losses = torch.zeros(rows, dtype=W.dtype, device=W.device)
    hdiag = hinv.diagonal()
    for i1, i2 in bounds:
        W1 = W[:, i1:i2]
        Hinv1 = hinv[i1:i2, i1:i2]
        if fixed_pruned is not None:
            prune1 = fixed_pruned[:, i1:i2]
        elif prune_n == 0:
            prune1 = block_mask(W1, hdiag[i1:i2], sparsity)
        else:
            prune1 = None
        Q1, Err1, prune1, loss1 = sweep(W1, Hinv1, prune1, prune_n, prune_m)
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = prune1
        losses += loss1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, hinv[i1:i2, i2:], alpha=-1)
    return W, pruned, losses


def unpruned_result(
    W: torch.Tensor, H: torch.Tensor | None, info: dict, t0: float, inplace: bool
) -> PruneResult:
    """sparsity == 0: nothing is pruned (the reference's `<=` rule would still drop one
    weight per block; we treat 0 as 'keep everything')."""
    weight = W if inplace else W.clone()
    info.update(seconds=time.perf_counter() - t0, achieved_sparsity=0.0, note="sparsity=0")
    keep = torch.ones(W.shape, dtype=torch.bool, device=W.device)
    return PruneResult(weight, keep, 0.0 if H is not None else None, info)


def obs_layer_loss(
    W: torch.Tensor,
    Q: torch.Tensor,
    H: torch.Tensor,
    dead: torch.Tensor,
    damp: float,
    errsum: float,
) -> tuple[float, str]:
    """The layer loss `tr(D H D^T)` of an OBS solve, without a `rows x cols x cols` GEMM.

    The sweep leaves `Wc - Q = Err U` exactly (U the upper Cholesky factor of the damped
    inverse, Wc the weights with dead columns zeroed), and `U H_damped U^T = I`, so
    `tr(D H D^T) = ||Err||^2 - damp * ||Wc - Q||^2` (dead columns carry no error and have
    zero rows in H). When the damping term cancels most of `||Err||^2` (heavy damping after
    retries) the explicit form is used instead, to keep full precision.
    """
    D = W.to(Q.dtype).masked_fill(dead.reshape(1, -1), 0) - Q
    damp_term = damp * (D * D).sum(dtype=torch.float64).item()
    if errsum > 0 and damp_term <= 0.5 * errsum:
        return errsum - damp_term, "obs identity"
    return layer_loss(W, Q, H), "explicit"


def _finish(
    W: torch.Tensor,
    Q: torch.Tensor,
    pruned: torch.Tensor,
    H: torch.Tensor,
    info: dict,
    t0: float,
    inplace: bool,
    inv: InverseHessian,
    losses: torch.Tensor,
    dead: torch.Tensor | None = None,
) -> PruneResult:
    """Loss, dtype cast, in-place write and timing; `dead` in W's column order (defaults to
    the inverse's own order)."""
    errsum = 2 * losses.sum(dtype=torch.float64).item()
    info["obs_loss_estimate"] = errsum / 2
    dead = inv.dead if dead is None else dead
    loss, info["loss_method"] = obs_layer_loss(W, Q, H, dead, inv.damp, errsum)
    weight = Q.to(W.dtype)
    if inplace:
        W.copy_(weight)
        weight = W
    keep = ~pruned
    info["achieved_sparsity"] = 1.0 - keep.float().mean().item()
    info["seconds"] = time.perf_counter() - t0
    return PruneResult(weight, keep, loss, info)


def _check_common(W, H, sparsity, prune_n, prune_m, blocksize, percdamp, backend):
    W = check_weight(W)
    H = check_hessian(H, W.shape[1], W.device)
    sparsity = check_sparsity(sparsity)
    n, m = check_pattern(prune_n, prune_m, W.shape[1])
    blocksize = check_int(blocksize, "blocksize", minimum=1)
    percdamp = check_percdamp(percdamp)
    check_backend(backend)
    return W, H, sparsity, n, m, blocksize, percdamp


def base_info(
    method: str,
    W: torch.Tensor,
    sparsity: float,
    n: int,
    m: int,
    backend: str,
    dtype: torch.dtype | None = None,
) -> dict:
    return {
        "method": method,
        "sparsity": n / m if n else sparsity,
        "pattern": pattern_name(n, m),
        "device": str(W.device),
        "backend": backend,
        "shape": tuple(W.shape),
        "compute_dtype": str(dtype or compute_dtype(W)).replace("torch.", ""),
    }


@torch.no_grad()
def sparsegpt_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    hinv: InverseHessian | None = None,
    inplace: bool = False,
) -> PruneResult:
    """Prune one layer with SparseGPT (OBS updates over blocks of columns).

    Same result as the IST-DASLab reference `fasterprune` with these arguments: the
    unstructured mask of each block prunes `w^2/Hinv_jj^2 <= sorted[int(numel*sparsity)]`
    (so one more than `int(numel*sparsity)` per block without ties, as the reference);
    N:M picks each group's `prune_n` lowest when the sweep reaches it. `mask` (True = kept)
    prunes exactly that pattern with the same OBS updates. `hinv` reuses an inverse from
    `fastprune.inverse_hessian(H, percdamp)` for layers sharing an input. Solves in float32
    (float64 if W or H is float64) and returns W's dtype; `W` is untouched unless `inplace`.
    """
    t0 = time.perf_counter()
    W, H, sparsity, n, m, blocksize, percdamp = _check_common(
        W, H, sparsity, prune_n, prune_m, blocksize, percdamp, backend
    )
    fixed_pruned = None
    if mask is not None:
        check_mask(mask, W.shape, W.device)
        if n and not check_nm_keep_mask(mask, n, m):
            raise ValueError(f"mask does not follow the {n}:{m} pattern given by prune_n/prune_m")
        fixed_pruned = ~mask
    name = ops.resolve_backend(backend, W.device, OBS_OPS)
    dtype = compute_dtype(W, H)
    info = base_info("sparsegpt", W, sparsity, n, m, name, dtype)
    info.update(blocksize=nm_blocksize(blocksize, m), percdamp=percdamp)
    if fixed_pruned is not None:
        info.update(sparsity=1.0 - mask.float().mean().item(), pattern="fixed mask")
    elif n == 0 and sparsity == 0.0:
        return unpruned_result(W, H, info, t0, inplace)
    inv = _resolve_inverse(hinv, H, percdamp, dtype)
    info.update(inv.as_info())
    Wc = W.to(dtype, copy=True)
    Wc[:, inv.dead] = 0
    bounds = block_bounds(W.shape[1], info["blocksize"])
    Q, pruned, losses = obs_prune(Wc, inv.hinv, bounds, sparsity, n, m, fixed_pruned, name)
    return _finish(W, Q, pruned, H, info, t0, inplace, inv, losses)


def _resolve_inverse(hinv, H, percdamp, dtype) -> InverseHessian:
    if hinv is None:
        return inverse_hessian(H, percdamp, dtype=dtype)
    if not isinstance(hinv, InverseHessian):
        raise TypeError("hinv must be an InverseHessian from fastprune.inverse_hessian")
    if hinv.hinv.shape != H.shape or hinv.hinv.device != H.device:
        raise ValueError(
            f"hinv is {tuple(hinv.hinv.shape)} on {hinv.hinv.device}, "
            f"H is {tuple(H.shape)} on {H.device}"
        )
    if hinv.hinv.dtype != dtype:
        return InverseHessian(
            hinv.hinv.to(dtype), hinv.dead, hinv.damp, hinv.percdamp, hinv.retries
        )
    return hinv
