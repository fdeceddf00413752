"""SparseGPT (IST-DASLab `fasterprune`) as a layer-level solver over the OBS block loop."""

from __future__ import annotations

import torch

from ..hessian import DEFAULT_PERCDAMP, InverseHessian, layer_loss
from ..masks import pruned_fraction
from ..quant import QuantSpec, as_spec
from ..result import PruneResult
from .core import check_obs_options, check_quant_pattern, resolve_inverse
from .obs import (
    DEFAULT_BLOCKSIZE,
    OBS_OPS,
    actorder_perm,
    block_bounds,
    nm_blocksize,
    obs_loss_info,
    obs_prune,
    plan_quant,
    quant_blocksize,
)
from .registry import Method, Selection, register, solver_defaults
from .skeleton import (
    Outcome,
    Problem,
    beyond_lead,
    check_given_mask,
    legacy_positional,
    run_solver,
    unpruned,
)


@legacy_positional(
    ("W", "H", "sparsity", "prune_n", "prune_m", "blocksize", "percdamp", "mask", "backend"),
    beyond_lead,
    "sparsegpt_layer(W, H, sparsity, prune_n, prune_m, blocksize=..., percdamp=..., ...)",
)
@torch.no_grad()
def sparsegpt_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    hinv: InverseHessian | None = None,
    inplace: bool = False,
    inverse_method: str = "direct",
    quant: QuantSpec | str | None = None,
) -> PruneResult:
    """Prune one layer with SparseGPT (OBS updates over blocks of columns).

    Same result as the IST-DASLab reference `fasterprune` with these arguments: the
    unstructured mask of each block prunes `w^2/Hinv_jj^2 <= sorted[int(numel*sparsity)]`
    (so one more than `int(numel*sparsity)` per block without ties, as the reference);
    N:M picks each group's `prune_n` lowest when the sweep reaches it. `mask` (True = kept)
    prunes exactly that pattern with the same OBS updates. `hinv` reuses an inverse from
    `fastprune.inverse_hessian(H, percdamp)` for layers sharing an input; otherwise it is
    computed by `inverse_method` ("direct", or "reference": SparseGPT's own arithmetic, see
    `inverse_hessian`). `quant` (a `QuantSpec` or a preset name) also rounds each kept weight
    to its grid in the same sweep (GPTQ's step; with `QuantSpec(group_size=None,
    params="static", sym=False)` SparseGPT's own `--wbits`): `r.quant` holds the codes and
    grids, `r.weight` the dequantized weights. Solves in float32
    (float64 if W or H is float64) and returns W's dtype; `W` is untouched unless `inplace`.
    """

    def check(W: torch.Tensor, H: torch.Tensor | None) -> None:
        nonlocal blocksize, percdamp
        blocksize, percdamp = check_obs_options(blocksize, percdamp)
        check_given_mask(mask, W, prune_n, prune_m)
        check_quant_pattern(spec, prune_n, prune_m)

    def solve(p: Problem) -> Outcome:
        return obs_solve(p, blocksize, percdamp, hinv, inverse_method, mask, spec)

    spec = as_spec(quant)
    return run_solver(
        "sparsegpt", W, H, sparsity, prune_n, prune_m, solve, backend=backend, ops=OBS_OPS,
        inplace=inplace, check=check,
    )  # fmt: skip


def obs_solve(
    p: Problem,
    blocksize: int,
    percdamp: float,
    hinv: InverseHessian | None,
    inverse_method: str,
    mask: torch.Tensor | None,
    spec: QuantSpec | None,
) -> Outcome:
    """SparseGPT's solve of one problem, quantized with `spec` (act-order: the sweep in
    decreasing diag(H), its own inverse of the permuted H, then un-permuted)."""
    info = p.info
    info.update(blocksize=quant_blocksize(nm_blocksize(blocksize, p.m), spec), percdamp=percdamp)
    keep_all = p.n == 0 and p.sparsity == 0.0 and mask is None
    if mask is not None:
        info.update(sparsity=pruned_fraction(mask), pattern="fixed mask")
    elif keep_all and spec is None:
        return unpruned(p)
    if keep_all:  # quantization alone: every weight kept
        mask = torch.ones(p.W.shape, dtype=torch.bool, device=p.W.device)
    perm = actorder_perm(p.H) if spec is not None and spec.actorder else None
    W, H, fixed = p.W, p.H, mask
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        fixed = None if mask is None else mask[:, perm]
        inv = resolve_inverse(None, H, percdamp, p.dtype, inverse_method)
    else:
        inv = resolve_inverse(p.inverse(hinv), H, percdamp, p.dtype, inverse_method)
    info.update(inv.as_info())
    Wc = W.to(p.dtype, copy=True)
    bounds = block_bounds(W.shape[1], info["blocksize"])
    return swept(p, Wc, inv, bounds, fixed, spec, perm, p.W, info)


def swept(p: Problem, Wc, inv, bounds, fixed, spec, perm, Wr, info, rows=None) -> Outcome:
    """The OBS sweep of `Wc` (the rows solved, a working copy in the sweep's column order
    `perm`; modified) with inverse `inv`, quantized with `spec`, un-permuted, its loss
    measured against the original rows `Wr`: the end SparseGPT and ROSE share."""
    plan = None if spec is None else plan_quant(spec, Wc, bounds)
    Wc[:, inv.dead] = 0
    Q, keep, losses = obs_prune(
        Wc, inv.hinv, bounds, p.sparsity, p.n, p.m, p.kernels, fixed_keep=fixed, quant=plan
    )
    dead = inv.dead
    if perm is not None:
        inv_perm = torch.argsort(perm)
        Q, keep, dead = Q[:, inv_perm], keep[:, inv_perm], dead[inv_perm]
    qw = None
    if plan is not None:
        qw = plan.result(Q, perm)
        info["quant"] = plan.info
    loss = obs_loss_info(Wr, Q, p.H, inv, losses, info, dead)
    return Outcome(Q, keep, loss, rows, quant=qw)


def quantize_on_mask(
    W: torch.Tensor,
    H: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    spec: QuantSpec,
    prune_n: int = 0,
    prune_m: int = 0,
    **options,
) -> PruneResult:
    """Round `weight` (W pruned to `mask` and reconstructed) to the grids of `spec` by an OBS
    sweep on that mask: the rounding errors spread over the kept weights to their right
    (GPTQ of the sparse layer). For least-squares weights on the mask, the loss of the result
    against `W` is that of `weight` plus that of the rounding; `r.loss` is against `W`."""
    r = sparsegpt_layer(
        weight.to(W.dtype), H, prune_n=prune_n, prune_m=prune_m, mask=mask, quant=spec,
        **options,
    )  # fmt: skip
    r.loss = layer_loss(W, r.weight, H)
    return r


def _select(
    W, H, sparsity, prune_n, prune_m, *, blocksize, percdamp, backend, hinv, quant=None, **_
) -> PruneResult:
    """A composition's mask and weights: SparseGPT's, with the shared inverse (the hook);
    `quant`: rounded in the same sweep."""
    pat = {"sparsity": sparsity, "prune_n": prune_n, "prune_m": prune_m}
    obs = {"blocksize": blocksize, "percdamp": percdamp, "backend": backend}
    return sparsegpt_layer(W, H, **pat, **obs, hinv=hinv, quant=quant)


def _experts(W, H, sparsity, prune_n, prune_m, **options) -> list[PruneResult]:
    """The batch solver, `sparsegpt_batched.sparsegpt_experts` (imported when first called:
    that module builds on this one)."""
    from .sparsegpt_batched import sparsegpt_experts

    return sparsegpt_experts(W, H, sparsity, prune_n, prune_m, **options)


register(
    Method(
        "sparsegpt",
        sparsegpt_layer,
        "OBS pruning with weight updates (IST-DASLab SparseGPT)",
        solver_defaults(sparsegpt_layer, "blocksize", "percdamp", "backend"),
        shares_inverse=True,
        takes_quant=True,
        batch_solver=_experts,
        # unstructured, each block's threshold is over all rows; N:M is per group
        select=Selection(
            _select,
            row_separable=lambda prune_n: prune_n > 0,
            obs_weights=True,
            reads_inverse=True,
        ),  # fmt: skip
    )
)
