"""SparseGPT for a batch of same-shaped layers at once (the experts of one MoE projection):
one batched damping, Cholesky factorisation and triangular inverse, then one OBS block loop
whose mask selection, in-block sweep and trailing GEMMs each cover every layer. Each result
equals `sparsegpt_layer(W[e], H[e], ...)` with the torch kernels, up to float rounding.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence

import torch

from ..core import base_info, check_obs_args, finish, problem_scales
from ..hessian import (
    H_RANGE,
    InverseHessian,
    check_inverse_of,
    inverse_hessian,
    upper_triangular_inverse,
)
from ..masks import threshold_prune_mask
from ..obs import block_bounds, nm_blocksize, obs_loss_info
from ..ops import BackendUnavailableError
from ..ops.obs_sweep import torch_obs_sweep_batched
from ..result import PruneResult
from ..validation import compute_dtype
from .sparsegpt import sparsegpt_layer


@torch.no_grad()
def inverse_hessians(
    H: torch.Tensor | Sequence[torch.Tensor],
    percdamp: float = 0.01,
    dtype: torch.dtype | None = None,
) -> list[InverseHessian]:
    """`inverse_hessian` for every `H[e]` of `H` (`[E, cols, cols]`, or E `[cols, cols]`
    tensors): the requested damping, dead columns and direct factor computed for all at
    once; an `H[e]` that needs more (damping retries, a factor that is not finite, a diagonal
    outside `H_RANGE`, no positive mean) goes through `inverse_hessian` alone, so every entry
    gets exactly its rules. Each inverse remembers its own `H[e]` as `inverse_hessian`'s do."""
    Hs = list(H)
    wide = any(h.dtype == torch.float64 for h in Hs)
    dtype = dtype or (torch.float64 if wide else torch.float32)
    Hd = torch.stack([h.to(dtype) for h in Hs])  # the one working copy
    diag = Hd.diagonal(dim1=1, dim2=2)
    dead = diag == 0
    hmax = diag.amax(1)
    diag[dead] = 1
    mean_diag = diag.mean(1)
    damp = percdamp * mean_diag
    A = torch.flip(Hd, (1, 2))
    del Hd
    A.diagonal(dim1=1, dim2=2).add_(damp[:, None])
    L, info = torch.linalg.cholesky_ex(A)
    del A
    U = upper_triangular_inverse(torch.flip(L, (1, 2)))
    del L
    finite = torch.isfinite(U).flatten(1).all(1)
    ok = (info == 0) & finite & (mean_diag > 0) & ((hmax == 0) | (hmax >= H_RANGE[0]))
    ok &= hmax <= H_RANGE[1]
    out = []
    for h, u, dd, good, dm in zip(Hs, U, dead, ok.tolist(), damp.tolist()):
        if good:
            source = (weakref.ref(h), h._version)
            out.append(InverseHessian(u, dd, dm, percdamp, source=source))
        else:
            out.append(inverse_hessian(h, percdamp, dtype=dtype))
    return out


def _batched_sweep(backend: str, device: torch.device):
    """(the batched `obs_sweep` for `backend` on `device`, the name of what runs)."""
    if backend == "cuda":
        raise ValueError("backend='cuda' has no batched obs_sweep; use 'auto', 'triton' or 'torch'")
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        try:
            from ..triton_kernels.obs_sweep import triton_obs_sweep_batched
        except ImportError as e:
            if backend == "triton":
                raise BackendUnavailableError(f"backend='triton' needs triton: {e}") from e
        else:
            return triton_obs_sweep_batched, "triton"
    return torch_obs_sweep_batched, "torch"


def _block_keep(W1: torch.Tensor, hdiag: torch.Tensor, sparsity: float) -> torch.Tensor:
    """`block_prune_mask` for every layer of `W1 [E, rows, count]` (each its own threshold)."""
    return ~threshold_prune_mask(W1**2 / hdiag[:, None, :] ** 2, sparsity, start_dim=1)


@torch.no_grad()
def sparsegpt_experts(
    W: torch.Tensor,
    H: torch.Tensor | Sequence[torch.Tensor],
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    backend: str = "auto",
    *,
    hinvs: list[InverseHessian] | None = None,
) -> list[PruneResult]:
    """`sparsegpt_layer` on each of `W [E, rows, cols]` with `H` (`[E, cols, cols]`, or E
    `[cols, cols]` tensors, not stacked again: the pipeline passes its accumulators'), solved
    together on W's device: the in-block sweep of every layer in one launch of Triton's
    `obs_sweep` (`backend` "triton", or "auto" on a GPU), else torch's batched sweep ("torch",
    or "auto" on CPU). `hinvs`: one inverse per layer, as
    `inverse_hessians(H, percdamp)` gives (computed here if None). A layer whose weights or
    Hessian need the solver's exact power-of-two rescaling is solved alone by
    `sparsegpt_layer`. Each result's `seconds` is its share of the batch's time."""
    t0 = time.perf_counter()
    Hs = list(H) if isinstance(H, torch.Tensor) and H.dim() == 3 else H
    if W.dim() != 3 or not isinstance(Hs, Sequence) or len(Hs) != W.shape[0]:
        got = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(
            f"W must be [E, rows, cols] and H [E, cols, cols], got {tuple(W.shape)} and {got}"
        )
    E = W.shape[0]
    for e in range(E):  # every layer's weights and Hessian checked as the solver checks them
        _, _, sparsity, n, m, blocksize, percdamp = check_obs_args(
            W[e], Hs[e], sparsity, prune_n, prune_m, blocksize, percdamp, backend
        )
    sweep, kernel = _batched_sweep(backend, W.device)
    results: list[PruneResult | None] = [None] * E
    alone = [e for e in range(E) if problem_scales(W[e], Hs[e]) is not None]
    for e in alone:
        hinv = None if hinvs is None else hinvs[e]
        results[e] = sparsegpt_layer(
            W[e], Hs[e], sparsity, n, m, blocksize=blocksize, percdamp=percdamp,
            backend=backend, hinv=hinv,
        )  # fmt: skip
    batch = [e for e in range(E) if e not in alone]
    if batch and (n or sparsity > 0.0):
        dtype = compute_dtype(W, *Hs)
        idx = torch.tensor(batch, device=W.device)
        if hinvs is None:
            invs = inverse_hessians([Hs[e] for e in batch], percdamp, dtype)
        else:
            invs = [hinvs[e] for e in batch]
            for e, inv in zip(batch, invs):
                check_inverse_of(inv, Hs[e], f"hinvs[{e}]")
        U = torch.stack([i.hinv.to(dtype) for i in invs])
        dead = torch.stack([i.dead for i in invs])
        Wc = W.index_select(0, idx).to(dtype, copy=True)
        Wc.masked_fill_(dead[:, None, :], 0)
        bsz = nm_blocksize(blocksize, m)
        keep = torch.ones(Wc.shape, dtype=torch.bool, device=W.device)
        losses = torch.zeros(Wc.shape[:2], dtype=dtype, device=W.device)
        hdiag = U.diagonal(dim1=1, dim2=2)
        for i1, i2 in block_bounds(W.shape[2], bsz):
            W1 = Wc[:, :, i1:i2]
            keep1 = None if n else _block_keep(W1, hdiag[:, i1:i2], sparsity)
            Q1, Err1, keep1, loss1 = sweep(W1, U[:, i1:i2, i1:i2], keep1, n, m)
            Wc[:, :, i1:i2] = Q1
            keep[:, :, i1:i2] = keep1
            losses += loss1
            if i2 < W.shape[2]:
                Wc[:, :, i2:].baddbmm_(Err1, U[:, i1:i2, i2:], alpha=-1)
        share = (time.perf_counter() - t0) / len(batch)
        for j, e in enumerate(batch):
            info = base_info("sparsegpt", W[e], sparsity, n, m, kernel, dtype)
            info.update(blocksize=bsz, percdamp=percdamp, batched=len(batch))
            info.update(invs[j].as_info())
            info["kernels"] = {"block_prune_mask": "torch", "obs_sweep": f"{kernel} (batched)"}
            if n:
                del info["kernels"]["block_prune_mask"]
            loss = obs_loss_info(W[e], Wc[j], Hs[e], invs[j], losses[j], info)
            r = finish(W[e], Wc[j], keep[j], loss, info, time.perf_counter(), False)
            r.info["seconds"] = share
            results[e] = r
    for e in range(E):  # sparsity 0, nothing batched: the solver's own rule
        if results[e] is None:
            results[e] = sparsegpt_layer(
                W[e], Hs[e], sparsity, n, m, blocksize=blocksize, percdamp=percdamp,
                backend=backend,
            )  # fmt: skip
    return results  # type: ignore[return-value]
