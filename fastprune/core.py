"""What every layer-level solver shares: input checks, the Wanda score, the result's base
info, inverse resolution and the finishing of a result (dtype cast, in-place write, timing)."""

from __future__ import annotations

import time

import torch

from .hessian import InverseHessian, inverse_hessian
from .masks import pattern_name
from .result import PruneResult
from .validation import (
    check_backend,
    check_hessian,
    check_int,
    check_pattern,
    check_percdamp,
    check_sparsity,
    check_weight,
    compute_dtype,
)


def wanda_score(
    W: torch.Tensor,
    H: torch.Tensor | None = None,
    *,
    scaler: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Wanda's score `|W| * sqrt(scaler)` with `scaler = diag(H)/2` (the per-input-channel
    `||x_j||^2 / n`) unless a `scaler` is given; in float32, or float64 for float64 inputs."""
    if scaler is None:
        if H is None:
            raise ValueError("wanda_score needs H or scaler")
        scaler = torch.diagonal(H) / 2
    dtype = dtype or compute_dtype(W, scaler)
    return W.to(dtype).abs() * torch.sqrt(scaler.to(dtype)).reshape(1, -1)


def check_obs_args(
    W, H, sparsity, prune_n, prune_m, blocksize, percdamp, backend, *, blocksize_name="blocksize"
):
    """The checks of the OBS solvers' common arguments; returns them normalised.
    `blocksize_name` is how the caller spells that argument (llm-compressor: block_size)."""
    W = check_weight(W)
    H = check_hessian(H, W.shape[1], W.device)
    sparsity = check_sparsity(sparsity)
    n, m = check_pattern(prune_n, prune_m, W.shape[1])
    blocksize = check_int(blocksize, blocksize_name, minimum=1)
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
    """The entries every result's `info` starts with; `kernels` is filled as ops run."""
    return {
        "method": method,
        "sparsity": n / m if n else sparsity,
        "pattern": pattern_name(n, m),
        "device": str(W.device),
        "backend": backend,
        "kernels": {},
        "shape": tuple(W.shape),
        "compute_dtype": str(dtype or compute_dtype(W)).replace("torch.", ""),
    }


def resolve_inverse(
    hinv: InverseHessian | None,
    H: torch.Tensor,
    percdamp: float,
    dtype: torch.dtype,
    method: str = "direct",
) -> InverseHessian:
    """`hinv` checked against `H` (shape, device) and cast to `dtype`, or a new inverse by
    `inverse_hessian(H, percdamp, method=method)` (`method` does not apply to a given `hinv`)."""
    if hinv is None:
        return inverse_hessian(H, percdamp, dtype=dtype, method=method)
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


def finish(
    W: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    loss: float | None,
    info: dict,
    t0: float,
    inplace: bool,
) -> PruneResult:
    """The result: `weight` cast to W's dtype (written into W if `inplace`, after every
    figure that needs the original W was computed), achieved sparsity and seconds."""
    weight = weight.to(W.dtype)
    if inplace:
        W.copy_(weight)
        weight = W
    info["achieved_sparsity"] = 1.0 - keep.float().mean().item()
    info["seconds"] = time.perf_counter() - t0
    return PruneResult(weight, keep, loss, info)


def unpruned_result(
    W: torch.Tensor, H: torch.Tensor | None, info: dict, t0: float, inplace: bool
) -> PruneResult:
    """sparsity == 0: nothing is pruned (the reference's `<=` rule would still drop one
    weight per block; we treat 0 as 'keep everything')."""
    info["note"] = "sparsity=0"
    keep = torch.ones(W.shape, dtype=torch.bool, device=W.device)
    return finish(W, W.clone(), keep, 0.0 if H is not None else None, info, t0, inplace)
