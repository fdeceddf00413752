"""SparseGPT for a batch of same-shaped layers at once (the experts of one MoE projection):
one batched damping, Cholesky factorisation and triangular inverse, then the one OBS block
loop (`obs_prune`) over the batch, whose mask selection, in-block sweep and trailing GEMMs
each cover every layer. Each result equals `sparsegpt_layer(W[e], H[e], ...)` up to float
rounding.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from ..hessian import (
    DEFAULT_PERCDAMP,
    H_RANGE,
    InverseHessian,
    check_inverse_of,
    inverse_hessian,
    upper_triangular_inverse,
)
from ..quant import QuantSpec, as_spec
from ..result import PruneResult
from .core import check_obs_options, check_quant_pattern
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
from .skeleton import Outcome, Problem, run_batch_solver, unpruned


@torch.no_grad()
def inverse_hessians(
    H: torch.Tensor | Sequence[torch.Tensor],
    percdamp: float = DEFAULT_PERCDAMP,
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


@torch.no_grad()
def sparsegpt_experts(
    W: torch.Tensor,
    H: torch.Tensor | Sequence[torch.Tensor],
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    backend: str = "auto",
    *,
    hinvs: list[InverseHessian] | None = None,
    quant: QuantSpec | str | None = None,
) -> list[PruneResult]:
    """`sparsegpt_layer` on each of `W [E, rows, cols]` with `H` (`[E, cols, cols]`, or E
    `[cols, cols]` tensors, not stacked again: the pipeline passes its accumulators'), solved
    together on W's device in the solver skeleton (`run_batch_solver`: each layer checked and
    rescaled as alone) by the one OBS block loop (`obs_prune`) over the batch, with the ops'
    batched forms on the backend dispatch picks (on a GPU the fused sweep launched over the
    layers, on CPU torch's batched sweep). `hinvs`: one inverse per layer, as
    `inverse_hessians(H, percdamp)` gives (computed here if None). `quant`: each layer's kept
    weights rounded to its own grids in the same sweep, as `sparsegpt_layer(quant=)` (with
    act-order, each layer in its own column order, its inverse that of its permuted H)."""
    Hs = list(H) if isinstance(H, torch.Tensor) and H.dim() == 3 else H
    if W.dim() != 3 or not isinstance(Hs, Sequence) or len(Hs) != W.shape[0]:
        got = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(
            f"W must be [E, rows, cols] and H [E, cols, cols], got {tuple(W.shape)} and {got}"
        )
    if hinvs is not None and len(hinvs) != W.shape[0]:
        raise ValueError(f"hinvs must hold one inverse per layer ({W.shape[0]}), got {len(hinvs)}")

    def check(W1: torch.Tensor, H1: torch.Tensor | None) -> None:
        nonlocal blocksize, percdamp
        blocksize, percdamp = check_obs_options(blocksize, percdamp)
        check_quant_pattern(spec, prune_n, prune_m)

    def solve(problems: list[Problem]) -> list[Outcome]:
        p0 = problems[0]
        bsz = quant_blocksize(nm_blocksize(blocksize, p0.m), spec)
        for p in problems:
            p.info.update(blocksize=bsz, percdamp=percdamp, batched=len(problems))
        keep_all = p0.n == 0 and p0.sparsity == 0.0
        if keep_all and spec is None:
            return [unpruned(p) for p in problems]
        perms = [actorder_perm(p.H) for p in problems] if spec and spec.actorder else None
        if perms is not None:  # each layer's own column order and inverse of its permuted H
            Hp = [p.H[pm][:, pm] for p, pm in zip(problems, perms)]
            invs = inverse_hessians(Hp, percdamp, p0.dtype)
        elif hinvs is None:
            invs = inverse_hessians([p.H for p in problems], percdamp, p0.dtype)
        else:
            invs = [_given_inverse(p, hinv, e) for e, (p, hinv) in enumerate(zip(problems, hinvs))]
        U = torch.stack([inv.hinv.to(p0.dtype) for inv in invs])
        dead = torch.stack([inv.dead for inv in invs])
        Ws = [p.W for p in problems] if perms is None else [
            p.W[:, pm] for p, pm in zip(problems, perms)
        ]  # fmt: skip
        Wc = torch.stack([w.to(p0.dtype) for w in Ws])
        bounds = block_bounds(Wc.shape[-1], bsz)
        plan = None if spec is None else plan_quant(spec, Wc, bounds)
        Wc.masked_fill_(dead[:, None, :], 0)
        fixed = torch.ones(Wc.shape, dtype=torch.bool, device=Wc.device) if keep_all else None
        Q, keep, losses = obs_prune(
            Wc, U, bounds, p0.sparsity, p0.n, p0.m, p0.kernels, fixed_keep=fixed, quant=plan
        )
        plans = [None] * len(problems) if plan is None else plan.layers()
        outcomes = []
        for e, (p, inv, q, k, loss) in enumerate(zip(problems, invs, Q, keep, losses)):
            p.info.update(inv.as_info())
            perm, d = None if perms is None else perms[e], inv.dead
            if perm is not None:
                back = torch.argsort(perm)
                q, k, d = q[:, back], k[:, back], d[back]
            qw = None
            if plans[e] is not None:
                qw = plans[e].result(q, perm)
                p.info["quant"] = plans[e].info
            p_loss = obs_loss_info(p.W, q, p.H, inv, loss, p.info, d)
            outcomes.append(Outcome(q, k, p_loss, quant=qw))
        return outcomes

    spec = as_spec(quant)
    return run_batch_solver(
        "sparsegpt", W, Hs, sparsity, prune_n, prune_m, solve, backend=backend, ops=OBS_OPS,
        check=check,
    )  # fmt: skip


def _given_inverse(p: Problem, hinv: InverseHessian, e: int) -> InverseHessian:
    """`hinvs[e]`, the inverse of layer e's H as given, checked and on the problem's scale."""
    inv = p.inverse(hinv)
    if inv.hinv.shape != p.H.shape or inv.hinv.device != p.H.device:
        raise ValueError(
            f"hinvs[{e}] is {tuple(inv.hinv.shape)} on {inv.hinv.device}, "
            f"H is {tuple(p.H.shape)} on {p.H.device}"
        )
    check_inverse_of(inv, p.H, f"hinvs[{e}]")
    return inv
