"""The one OBS block loop (SparseGPT's), shared by SparseGPT, ROSE, the MoE experts' batch
solve and the llm-compressor adapter: per block of columns choose the mask, sweep the block
with OBS updates (one `obs_sweep` call), then the trailing GEMM
`W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]`. A batch of same-shaped layers (`W [E, rows, cols]`,
each with its own inverse) runs the same loop with the ops' batched forms."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..hessian import InverseHessian, layer_loss
from ..ops import Kernels
from ..ops.obs_sweep import QuantBlock, sub_matmul
from ..quant import QuantizedWeight, QuantSpec, find_params, packed

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


def quant_blocksize(blocksize: int, spec: QuantSpec | None) -> int:
    """The sweep's block cut at group boundaries: a multiple of `group_size`, or the group
    itself where it is wider than the block (per channel: `blocksize` as it is)."""
    if spec is None or spec.group_size is None:
        return blocksize
    gs = spec.group_size
    return gs if gs >= blocksize else (blocksize // gs) * gs


def actorder_perm(H: torch.Tensor) -> torch.Tensor:
    """GPTQ's act-order: columns by decreasing diag(H) (stable: equal ones keep their order)."""
    return torch.sort(H.diagonal(), descending=True, stable=True).indices


@dataclass
class QuantPlan:
    """The grids of one OBS solve. Each sweep block is cut into groups of `group_size`
    columns from its first column (per channel: one group for the layer); `group[j]` is the
    group of the sweep's column j. Static grids (params="static", or per channel, as GPTQ
    and SparseGPT find those before the loop) are found from the weights given to `plan_quant`;
    the others by the sweep, which fills `scale`/`zero` `[(E,) rows, n_groups]`. `num`/`den`
    sum `|w - q|^2` and `|w|^2` over kept weights (the grid error; of a batch, `[E]` tensors,
    one sum per layer)."""

    spec: QuantSpec
    scale: torch.Tensor
    zero: torch.Tensor
    group: torch.Tensor
    starts: list[int]  # the first group of each block
    find: bool
    num: float = 0.0
    den: float = 0.0
    info: dict = field(default_factory=dict)

    def block(self, b: int, i1: int, i2: int) -> QuantBlock:
        s = self.spec
        g0 = self.starts[b]
        if s.group_size is None:
            sl, gs = slice(0, 1), i2 - i1
        else:
            gs = s.group_size
            sl = slice(g0, g0 + -(-(i2 - i1) // gs))
        return QuantBlock(
            s.maxq, s.sym, s.fp8, gs, self.scale[..., sl], self.zero[..., sl], self.find
        )

    def store(self, b: int, out, Q1, Err1, keep1, d1) -> None:
        """A block's grids and its share of the grid error."""
        if self.find:
            G = out.scale.shape[-1]
            self.scale[..., self.starts[b] : self.starts[b] + G] = out.scale
            self.zero[..., self.starts[b] : self.starts[b] + G] = out.zero
        r = (Err1 * d1).masked_fill(~keep1, 0)
        w = (Q1 + r).masked_fill(~keep1, 0)
        if Err1.dim() == 3:  # a batch: each layer's own sums
            self.num = self.num + (r * r).sum((1, 2), dtype=torch.float64)
            self.den = self.den + (w * w).sum((1, 2), dtype=torch.float64)
            return
        self.num += (r * r).sum(dtype=torch.float64).item()
        self.den += (w * w).sum(dtype=torch.float64).item()

    def layers(self) -> list[QuantPlan]:
        """A batch's plan as one plan per layer: its grids and its grid error sums."""
        E = self.scale.shape[0]
        num, den = (torch.zeros(E, dtype=torch.float64) + torch.as_tensor(t).cpu()
                    for t in (self.num, self.den))  # fmt: skip
        return [
            replace(self, scale=self.scale[e], zero=self.zero[e], num=num[e].item(),
                    den=den[e].item(), info={})
            for e in range(E)
        ]  # fmt: skip

    def result(self, Q: torch.Tensor, perm: torch.Tensor | None = None) -> QuantizedWeight:
        """The `QuantizedWeight` of one layer's rounded weights `Q` (the layer's column
        order; `perm`: the sweep's order, `Q_sweep = Q[:, perm]`), and `info`."""
        group = self.group if perm is None else self.group[torch.argsort(perm)]
        gs = self.spec.group_size
        plain = torch.arange(Q.shape[-1], device=Q.device) // (gs or Q.shape[-1])
        g_idx = None if torch.equal(group, plain) else group.to(torch.int32)
        self.info = {
            **self.spec.as_info(),
            "grid_error": self.num / self.den if self.den > 0 else 0.0,
        }
        return packed(self.spec, Q, self.scale, self.zero, g_idx)


def plan_quant(spec: QuantSpec, W: torch.Tensor, bounds: list[tuple[int, int]]) -> QuantPlan:
    """The grids of a solve over `bounds` of `W [(E,) rows, cols]` (the sweep's column order,
    before dead columns are zeroed), static ones found here from `W`."""
    gs = spec.group_size
    cols = W.shape[-1]
    group = torch.empty(cols, dtype=torch.long, device=W.device)
    starts, G = [], 0
    for i1, i2 in bounds:
        starts.append(G if gs else 0)
        if gs:
            j = torch.arange(i2 - i1, device=W.device)
            group[i1:i2] = G + j // gs
            G += -(-(i2 - i1) // gs)
    if not gs:
        group.zero_()
        G = 1
    find = gs is not None and spec.params == "sweep"
    shape = (*W.shape[:-1], G)
    scale = torch.zeros(shape, dtype=W.dtype, device=W.device)
    zero = torch.zeros(shape, dtype=W.dtype, device=W.device)
    if not find:
        for g in range(G):
            cols_g = (group == g).nonzero().flatten()
            scale[..., g], zero[..., g] = find_params(W[..., cols_g], spec)
    return QuantPlan(spec, scale, zero, group, starts, find)


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
    quant: QuantPlan | None = None,
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
    never revive them. `quant` (from `plan_quant` over the same `bounds`): each kept weight
    is rounded to its group's grid in the sweep; the plan keeps the grids used. Returns
    `(W, keep, obs_loss_rows)` (`[(E,) rows]` losses).
    """
    if preserve is not None and W.dim() != 2:
        raise ValueError("preserve is for one layer, W [rows, cols]")
    cols = W.shape[-1]
    keep = torch.ones(W.shape, dtype=torch.bool, device=W.device)
    losses = torch.zeros(W.shape[:-1], dtype=W.dtype, device=W.device)
    hdiag = hinv.diagonal(dim1=-2, dim2=-1)
    for b, (i1, i2) in enumerate(bounds):
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
        qb = None if quant is None else quant.block(b, i1, i2)
        out = kernels("obs_sweep", W1, Hinv1, keep1, n, m, quant=qb)
        Q1, Err1, keep1, loss1 = out
        if quant is not None:
            d1 = hdiag[..., i1:i2].unsqueeze(-2)
            quant.store(b, out, Q1, Err1, keep1, d1)
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
