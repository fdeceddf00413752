"""CUDA backend: launchers of the hand-written kernels of `csrc/` (`obs_sweep.cu`,
`swap_search.cu`), each with the limits of what it takes. The other ops have no CUDA kernel:
the dispatcher runs Triton's or torch's and records which (`fastprune.ops.dispatch`).
Building and loading the extension is `fastprune.ops.cuda_ext`'s business."""

from __future__ import annotations

import torch

from .cuda_ext import extension_for, launch_context
from .obs_sweep import ObsSweep
from .swap_search import SwapSearch

MAX_SWEEP_COLS = 256  # obs_sweep keeps a block of up to 8 x 32 columns in registers
MAX_SWEEP_LAYERS = 65535  # a batched obs_sweep puts the layers on the grid's y dimension
MAX_SEARCH_COLS = 65535  # swap_search indexes columns in 16 bits


def cuda_obs_sweep_unsupported(W1, Hinv1, keep1, prune_n: int = 0, prune_m: int = 0, quant=None):
    if W1.dtype != torch.float32 or Hinv1.dtype != torch.float32:
        return f"float32 only, got {W1.dtype}/{Hinv1.dtype}"
    if W1.shape[-1] > MAX_SWEEP_COLS:
        return f"blocks of at most {MAX_SWEEP_COLS} columns, got {W1.shape[-1]}"
    if W1.dim() == 3 and W1.shape[0] > MAX_SWEEP_LAYERS:
        return f"batches of at most {MAX_SWEEP_LAYERS} layers, got {W1.shape[0]}"
    if prune_n and not 0 < prune_n < prune_m:
        return f"N:M needs 0 < N < M, got {prune_n}:{prune_m}"
    if prune_n and 32 % prune_m:
        return f"N:M needs M dividing 32, got M={prune_m}"
    return None


def cuda_obs_sweep(W1, Hinv1, keep1, prune_n: int = 0, prune_m: int = 0, quant=None) -> ObsSweep:
    """CUDA `obs_sweep` (contract: `fastprune.ops.obs_sweep`), one layer or a batch (one
    launch; the layers on the grid's y dimension); `quant` rounds to each group's grid."""
    ext = extension_for(W1)
    guard, stream, _ = launch_context(W1)
    if quant is None:
        grid = (None, None, 1, 1, False, False, False)
    else:
        scale, zero = (t.to(torch.float32) for t in (quant.scale, quant.zero))
        grid = (scale, zero, quant.group_size, quant.maxq, quant.sym, quant.fp8, quant.find)
    with guard:
        out = ext.obs_sweep(W1, Hinv1, keep1, prune_n, prune_m, *grid, stream)
    return ObsSweep(*out) if quant is not None else ObsSweep(*out[:4])


def cuda_swap_search_unsupported(w, keep, c, H, prune_n: int = 0, prune_m: int = 0, rows=None):
    if w.dtype != torch.float32:
        return f"float32 only, got {w.dtype}"
    if w.shape[1] > MAX_SEARCH_COLS:
        return f"at most {MAX_SEARCH_COLS} columns, got {w.shape[1]}"
    return None


def cuda_swap_search(w, keep, c, H, prune_n: int = 0, prune_m: int = 0, rows=None) -> SwapSearch:
    """CUDA `swap_search` (contract: `fastprune.ops.swap_search`)."""
    ext = extension_for(w)
    guard, stream, sms = launch_context(w)
    with guard:
        out = ext.swap_search(
            w.contiguous(),
            keep.contiguous(),
            c.contiguous(),
            H.to(w.dtype).contiguous(),
            prune_n,
            prune_m,
            rows,
            sms,
            stream,
        )
    return SwapSearch(*out)


OPS = {
    "obs_sweep": (cuda_obs_sweep, cuda_obs_sweep_unsupported),
    "swap_search": (cuda_swap_search, cuda_swap_search_unsupported),
}
BATCHED = frozenset({"obs_sweep"})  # the ops whose kernel also takes a batch of layers
QUANT = frozenset({"obs_sweep"})  # the ops whose kernel also takes quant= (float32, as without)
