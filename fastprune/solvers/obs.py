"""The one OBS block loop (SparseGPT's), shared by SparseGPT, ROSE, the MoE experts' batch
solve and the llm-compressor adapter: per block of columns choose the mask, sweep the block
with OBS updates (one `obs_sweep` call), then the trailing GEMM
`W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]`. A batch of same-shaped layers (`W [E, rows, cols]`,
each with its own inverse) runs the same loop with the ops' batched forms."""

from __future__ import annotations

import torch

from ..hessian import InverseHessian, layer_loss
from ..ops import Kernels
from ..ops.obs_sweep import sub_matmul

OBS_OPS = ("block_prune_mask", "obs_sweep")
# SparseGPT's column block: unstructured masks are chosen per block of this many columns
DEFAULT_BLOCKSIZE = 128


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
    kernels: Kernels,
    *,
    fixed_keep: torch.Tensor | None = None,
    preserve: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SparseGPT block loop over `bounds` on a float32/64 working copy `W` (modified):
    one layer (`W [rows, cols]`, `hinv [cols, cols]`) or a batch (`W [E, rows, cols]`, `hinv
    [E, cols, cols]`, `fixed_keep` as W), each layer with its own masks and inverse.

    Per block the mask is `fixed_keep`'s (pruned exactly, whatever the pattern), else chosen
    as SparseGPT does: by one threshold over the block (unstructured) or per N:M group inside
    the sweep. `preserve` (one layer only; True = must stay pruned: llm-compressor's existing
    zeros, which are zero in `W`) keeps those entries pruned: an unstructured block already at
    its target keeps its mask, one below extends it by the usual threshold; an N:M group
    prunes its preserved entries plus its lowest others up to `prune_n`; trailing updates
    never revive them. Returns `(W, keep, obs_loss_rows)` (`[(E,) rows]` losses).
    """
    if preserve is not None and W.dim() != 2:
        raise ValueError("preserve is for one layer, W [rows, cols]")
    cols = W.shape[-1]
    keep = torch.ones(W.shape, dtype=torch.bool, device=W.device)
    losses = torch.zeros(W.shape[:-1], dtype=W.dtype, device=W.device)
    hdiag = hinv.diagonal(dim1=-2, dim2=-1)
    for i1, i2 in bounds:
        W1 = W[..., i1:i2]
        Hinv1 = hinv[..., i1:i2, i1:i2]
        n, m = prune_n, prune_m
        if fixed_keep is not None:
            keep1, n, m = fixed_keep[..., i1:i2], 0, 0
        elif preserve is not None:
            base1 = preserve[:, i1:i2]
            if n:  # the sweep ranks preserved entries first and keeps them pruned
                keep1 = ~base1
            elif int(base1.numel() * sparsity) > base1.sum().item():
                keep1 = kernels("block_prune_mask", W1, hdiag[i1:i2], sparsity)
            else:
                keep1 = ~base1
        elif n == 0:
            keep1 = kernels("block_prune_mask", W1, hdiag[..., i1:i2], sparsity)
        else:
            keep1 = None
        Q1, Err1, keep1, loss1 = kernels("obs_sweep", W1, Hinv1, keep1, n, m)
        W[..., i1:i2] = Q1
        keep[..., i1:i2] = keep1
        losses += loss1
        if i2 < cols:
            sub_matmul(W[..., i2:], Err1, hinv[..., i1:i2, i2:])
            if preserve is not None:
                W[:, i2:].masked_fill_(preserve[:, i2:], 0)
    return W, keep, losses


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


def obs_loss_info(
    W: torch.Tensor,
    Q: torch.Tensor,
    H: torch.Tensor,
    inv: InverseHessian,
    losses: torch.Tensor,
    info: dict,
    dead: torch.Tensor | None = None,
) -> float:
    """The layer loss of an OBS solve (recorded in `info` with the OBS estimate and how the
    loss was computed); `dead` in W's column order (default: the inverse's own order)."""
    errsum = 2 * losses.sum(dtype=torch.float64).item()
    info["obs_loss_estimate"] = errsum / 2
    dead = inv.dead if dead is None else dead
    loss, info["loss_method"] = obs_layer_loss(W, Q, H, dead, inv.damp, errsum)
    return loss
