"""Op `obs_sweep`: SparseGPT's in-block column sweep (OBS updates), one call per block.

Contract. For a block `W1 [rows, count]` and `Hinv1 [count, count]` (upper triangular, the
block's slice of the upper Cholesky factor of `H^-1`), sweep the columns in order:

    q_i   = w_i * keep_i
    err_i = (w_i - q_i) / Hinv1[i, i]
    W1[:, j] -= err_i * Hinv1[i, j]        for j > i

Masks are keep-masks (True = kept), as everywhere at the op boundary.
- Unstructured or fixed mask (`prune_n == 0`): `keep1` is used as given (required).
- N:M (`prune_n > 0`): each group of `prune_m` columns chooses its mask when the sweep
  reaches its first column: the `prune_n` lowest `w^2 / Hinv1_jj^2` of the *updated*
  weights (a lower column wins an exact tie). An optional `keep1` marks entries that must be
  pruned whatever their score (`False`: llm-compressor's preserved zeros); they rank before
  every other entry (score -1; real scores are >= 0) and stay pruned, so a group prunes
  `max(prune_n, forced)` entries.
Batched form: `W1 [E, rows, count]`, `Hinv1 [E, count, count]`, `keep1 [E, rows, count]`
sweep E independent layers (the experts of one MoE projection) at once, each as above with
its own `Hinv1[e]`; every output gains the leading `E`. Which backends take it is declared
in their `BATCHED` (see `fastprune.ops.dispatch`).
Quantization (`quant`, a `QuantBlock`): each kept weight is also rounded to its group's grid
before its error is spread, `q_i = quantize(w_i * keep_i, scale[:, g], zero[:, g])` with
`g = i // group_size` (`fastprune.quant`); with `find` the op finds group g's grid from its
updated columns when the sweep reaches the group's first column (after any N:M choice there).
Returns `ObsSweep(q, err, keep, loss_rows, scale, zero)` in float32 (float64 if an input is
float64); `keep` is the mask used, `loss_rows = sum_i err_i^2 / 2` (the reference's OBS
estimate), `scale`/`zero` the grids used (None without `quant`). Inputs are not modified.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from ..masks import lowest_n_along_dim0
from ..quant import QuantSpec, find_params, quantize


class QuantBlock(NamedTuple):
    """The grid of a block's kept weights: `maxq` (2**bits - 1), `sym`, `fp8`, `group_size`
    columns per group inside the block (the block is whole groups, its last maybe partial,
    or one group's part), each group's `scale`/`zero` `[(E,) rows, G]`, and `find`: the op
    finds each group's grid from its updated columns (overwriting `scale`/`zero[:, g]`)."""

    maxq: int
    sym: bool
    fp8: bool
    group_size: int
    scale: torch.Tensor
    zero: torch.Tensor
    find: bool

    def spec(self) -> QuantSpec:
        """The grid as a `QuantSpec` (for `fastprune.quant`'s functions)."""
        if self.fp8:
            return QuantSpec(format="fp8", group_size=None)
        return QuantSpec(bits=(self.maxq + 1).bit_length() - 1, sym=self.sym, group_size=None)


class _Sweep(NamedTuple):
    q: torch.Tensor  # [(E,) rows, count] the pruned, updated block
    err: torch.Tensor  # [(E,) rows, count] err_i per column (0 where kept)
    keep: torch.Tensor  # [(E,) rows, count] bool, True = kept
    loss_rows: torch.Tensor  # [(E,) rows] sum_i err_i^2 / 2


class ObsSweep(_Sweep):
    """`(q, err, keep, loss_rows)`, and the grids used, `scale` and `zero` `[(E,) rows, G]`
    (None without quant): attributes beside the four, so every caller's
    `q, err, keep, loss = sweep` reads as before."""

    def __new__(cls, q, err, keep, loss_rows, scale=None, zero=None):
        self = super().__new__(cls, q, err, keep, loss_rows)
        self.scale, self.zero = scale, zero
        return self


def _sub_outer(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`out -= a ⊗ b`, per layer of a batch (`out [E, i, j]`, `a [E, i]`, `b [E, j]`); a
    batch of one takes the one-layer product, so it equals that layer's sweep bit for bit."""
    if out.dim() == 3 and out.shape[0] == 1:
        out, a, b = out[0], a[0], b[0]
    if out.dim() == 2:
        out.addr_(a, b, alpha=-1)
    else:
        out.baddbmm_(a[..., None], b[:, None, :], alpha=-1)


def sub_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`out -= a @ b`, per layer of a batch (`out [E, i, j]`, `a [E, i, k]`, `b [E, k, j]`);
    a batch of one takes the one-layer product (bit for bit that layer's)."""
    if out.dim() == 3 and out.shape[0] == 1:
        out, a, b = out[0], a[0], b[0]
    if out.dim() == 2:
        out.addmm_(a, b, alpha=-1)
    else:
        out.baddbmm_(a, b, alpha=-1)


def torch_obs_sweep(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    keep1: torch.Tensor | None,
    prune_n: int = 0,
    prune_m: int = 0,
    inner: int = 16,
    quant: QuantBlock | None = None,
) -> ObsSweep:
    """Reference `obs_sweep`, one layer or a batch: columns in sub-blocks of `inner` (a
    multiple of `prune_m`), rank-1 updates inside a sub-block and one GEMM for the rest of
    the block (the reference's arithmetic up to float rounding, lighter on memory), on a
    transposed copy. A batch runs the same steps on every layer at once (batched products
    in place of `addr_` / `addmm_`), so one Python loop over columns serves all E. With
    `find`, a sub-block also starts at each group's first column, so the group's columns
    hold every earlier update when its grid is found."""
    if W1.dim() not in (2, 3) or Hinv1.shape != (*W1.shape[:-2], W1.shape[-1], W1.shape[-1]):
        raise ValueError(
            f"W1 must be [(E,) rows, count] and Hinv1 [(E,) count, count], got "
            f"{tuple(W1.shape)} and {tuple(Hinv1.shape)}"
        )
    count, rows = W1.shape[-1], W1.shape[-2]
    dt = torch.float64 if torch.float64 in (W1.dtype, Hinv1.dtype) else torch.float32
    Hinv1 = Hinv1.to(dt)
    # one column per row of the state
    WT = torch.empty(*W1.shape[:-2], count, rows, dtype=dt, device=W1.device)
    WT.copy_(W1.transpose(-2, -1))
    QT = torch.empty_like(WT)
    ET = torch.empty_like(WT)
    d = Hinv1.diagonal(dim1=-2, dim2=-1)
    nm = prune_n > 0
    if nm:
        forcedT = None if keep1 is None else ~keep1.transpose(-2, -1)
        pruneT = torch.zeros(WT.shape, dtype=torch.bool, device=WT.device)
        step = max(prune_m, (inner // prune_m) * prune_m)
    else:
        if keep1 is None:
            raise ValueError("keep1 is required for an unstructured or fixed-mask sweep")
        pruneT = ~keep1.transpose(-2, -1)
        step = inner
    starts = set(range(0, count, step))
    if quant is not None:
        spec, gs = quant.spec(), quant.group_size
        G = -(-count // gs)
        if quant.scale.shape != (*W1.shape[:-1], G) or quant.zero.shape != quant.scale.shape:
            raise ValueError(
                f"quant.scale and quant.zero must be [(E,) rows, {G}] for {count} columns in "
                f"groups of {gs}, got {tuple(quant.scale.shape)}, {tuple(quant.zero.shape)}"
            )
        if quant.find and nm and gs % prune_m:
            raise ValueError(f"quant.group_size={gs} must be a multiple of prune_m={prune_m}")
        scaleT = quant.scale.transpose(-2, -1).to(dt, copy=True)  # [(E,) G, rows]
        zeroT = quant.zero.transpose(-2, -1).to(dt, copy=True)
        if quant.find:
            starts |= set(range(0, count, gs))
    bounds = sorted(starts) + [count]
    for j1, j2 in zip(bounds[:-1], bounds[1:]):
        # a block with nothing pruned (GPTQ, a dense stretch) skips the masking
        masked = nm or bool(pruneT[..., j1:j2, :].any())
        for i in range(j1, j2):
            if nm and i % prune_m == 0:
                g = WT[..., i : i + prune_m, :] ** 2 / d[..., i : i + prune_m, None] ** 2
                if forcedT is not None:
                    f = forcedT[..., i : i + prune_m, :]
                    g = g.masked_fill(f, -1)
                # [(E,) m, rows] -> [m, (E *) rows]: the groups of every layer ranked at once
                gm = g.movedim(-2, 0)
                low = lowest_n_along_dim0(gm.reshape(gm.shape[0], -1), prune_n)
                low = low.reshape(gm.shape).movedim(0, -2)
                pruneT[..., i : i + prune_m, :] = low if forcedT is None else low | f
            w = WT[..., i, :]
            q = w.masked_fill(pruneT[..., i, :], 0) if masked else w
            if quant is not None:
                g = i // gs
                if quant.find and i % gs == 0:
                    s, z = find_params(WT[..., i : i + gs, :].transpose(-2, -1), spec)
                    scaleT[..., g, :], zeroT[..., g, :] = s, z
                q = quantize(q, scaleT[..., g, :], zeroT[..., g, :], spec)
            err = (w - q) / d[..., i, None]
            QT[..., i, :] = q
            ET[..., i, :] = err
            if i + 1 < j2:
                _sub_outer(WT[..., i + 1 : j2, :], Hinv1[..., i, i + 1 : j2], err)
        if j2 < count:
            HT = Hinv1[..., j1:j2, j2:].transpose(-2, -1)
            sub_matmul(WT[..., j2:, :], HT, ET[..., j1:j2, :])
    loss_rows = (ET * ET).sum(-2) / 2
    grids = (None, None)
    if quant is not None:
        grids = (scaleT.transpose(-2, -1), zeroT.transpose(-2, -1))
    return ObsSweep(
        QT.transpose(-2, -1), ET.transpose(-2, -1), ~pruneT.transpose(-2, -1), loss_rows, *grids
    )


def torch_obs_sweep_batched(*args, **kwargs) -> ObsSweep:
    """Deprecated: `torch_obs_sweep` takes the batched form itself."""
    warnings.warn(
        "torch_obs_sweep_batched is deprecated; torch_obs_sweep takes W1 [E, rows, count]",
        DeprecationWarning,
        stacklevel=2,
    )
    return torch_obs_sweep(*args, **kwargs)
