"""SparseGPT (IST-DASLab `fasterprune`) as a layer-level solver over the OBS block loop."""

from __future__ import annotations

import time

import torch

from ..core import (
    base_info,
    check_obs_args,
    finish,
    problem_scales,
    resolve_inverse,
    scale_inverse,
    solve_rescaled,
    unpruned_result,
)
from ..hessian import InverseHessian
from ..masks import check_nm_keep_mask
from ..obs import OBS_OPS, block_bounds, nm_blocksize, obs_loss_info, obs_prune
from ..ops import Kernels
from ..result import PruneResult
from ..validation import check_inplace, check_mask, compute_dtype


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
    inverse_method: str = "direct",
) -> PruneResult:
    """Prune one layer with SparseGPT (OBS updates over blocks of columns).

    Same result as the IST-DASLab reference `fasterprune` with these arguments: the
    unstructured mask of each block prunes `w^2/Hinv_jj^2 <= sorted[int(numel*sparsity)]`
    (so one more than `int(numel*sparsity)` per block without ties, as the reference);
    N:M picks each group's `prune_n` lowest when the sweep reaches it. `mask` (True = kept)
    prunes exactly that pattern with the same OBS updates. `hinv` reuses an inverse from
    `fastprune.inverse_hessian(H, percdamp)` for layers sharing an input; otherwise it is
    computed by `inverse_method` ("direct", or "reference": SparseGPT's own arithmetic, see
    `inverse_hessian`). Solves in float32
    (float64 if W or H is float64) and returns W's dtype; `W` is untouched unless `inplace`.
    """
    t0 = time.perf_counter()
    W, H, sparsity, n, m, blocksize, percdamp = check_obs_args(
        W, H, sparsity, prune_n, prune_m, blocksize, percdamp, backend
    )
    check_inplace(inplace, W)
    if mask is not None:
        check_mask(mask, W.shape, W.device)
        if n and not check_nm_keep_mask(mask, n, m):
            raise ValueError(f"mask does not follow the {n}:{m} pattern given by prune_n/prune_m")
    scales = problem_scales(W, H)
    if scales is not None:  # huge or tiny W/H: solved on an exactly rescaled copy
        if hinv is not None:
            hinv = scale_inverse(hinv, scales[1], compute_dtype(W, H))

        def solve(Ws, Hs):
            return sparsegpt_layer(
                Ws, Hs, sparsity, n, m, blocksize, percdamp, mask, backend,
                hinv=hinv, inverse_method=inverse_method,
            )  # fmt: skip

        return solve_rescaled(W, H, scales, solve, t0, inplace)
    kernels = Kernels(backend, W.device, OBS_OPS)
    dtype = compute_dtype(W, H)
    info = base_info("sparsegpt", W, sparsity, n, m, kernels.backend, dtype)
    info.update(blocksize=nm_blocksize(blocksize, m), percdamp=percdamp)
    if mask is not None:
        info.update(sparsity=1.0 - mask.float().mean().item(), pattern="fixed mask")
    elif n == 0 and sparsity == 0.0:
        return unpruned_result(W, H, info, t0, inplace)
    inv = resolve_inverse(hinv, H, percdamp, dtype, inverse_method)
    info.update(inv.as_info())
    Wc = W.to(dtype, copy=True)
    Wc[:, inv.dead] = 0
    bounds = block_bounds(W.shape[1], info["blocksize"])
    Q, keep, losses = obs_prune(Wc, inv.hinv, bounds, sparsity, n, m, kernels, fixed_keep=mask)
    loss = obs_loss_info(W, Q, H, inv, losses, info)
    info.update(kernels.info())
    return finish(W, Q, keep, loss, info, t0, inplace)
