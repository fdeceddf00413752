"""SparseSwaps: refine a pruning mask by optimal 1-swaps per row (weights unchanged).

Rows decouple when each keeps its own count. For a row with keep-mask m, pruned residual
`r = w * (1-m)`, loss `L = r^T H r` and `c = H r`, un-pruning p and pruning u changes the
loss by `Δ = w_u^2 H_uu + w_p^2 H_pp - 2 w_u w_p H_up + 2 w_u c_u - 2 w_p c_p`. Each step
applies every row's best swap with `Δ < 0` at once and updates `c`; rows without an
improving swap stop.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..hessian import DEFAULT_PERCDAMP, InverseHessian
from ..masks import pattern_name, pruned_fraction, selection_prune_mask
from ..ops import Kernels
from ..result import PruneResult
from ..validation import (
    check_bool,
    check_device,
    check_int,
    check_weight,
)
from .core import merge_kernel_info, wanda_score
from .registry import Method, register, solver_defaults
from .skeleton import (
    Outcome,
    Problem,
    check_given_mask,
    legacy_positional,
    run_solver,
    tensor_or_none_at,
)
from .sparsegpt import sparsegpt_layer

SWAP_OPS = ("swap_search", "swap_apply")
REFRESH_EVERY = 32  # recompute c = H r exactly every this many steps (bounds drift)


def _noise_floor(w, c, H, rows, u, p):
    """Rounding bound of a computed Δ: only swaps below `-tol` count as improvements, so
    float noise can never make the search cycle."""
    eps = torch.finfo(w.dtype).eps
    wu, wp = w[rows, u], w[rows, p]
    mag = (wu * wu * H[u, u]).abs() + (wp * wp * H[p, p]).abs() + 2 * (wu * wp * H[u, p]).abs()
    mag = mag + 2 * (wu * c[rows, u]).abs() + 2 * (wp * c[rows, p]).abs()
    return 64 * eps * mag


@torch.no_grad()
def swap_refine(
    W: torch.Tensor,
    H: torch.Tensor,
    keep: torch.Tensor,
    prune_n: int = 0,
    prune_m: int = 0,
    max_swaps: int | None = None,
    kernels: Kernels | None = None,
    progress: bool = False,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The SparseSwaps step loop on float32/64 `W`, `H`; returns the refined keep-mask and
    counters. `max_swaps` bounds the number of steps (each step swaps at most once per row);
    `kernels` runs the ops (default: the torch reference). `W` holds the value each entry has
    while kept; the residual is `target - W * keep` (`target` default `W`: `W * ~keep`), and
    the same Δ holds for any residual, since a swap adds `W_u e_u - W_p e_p` to it."""
    kernels = kernels or Kernels("torch", W.device, SWAP_OPS)
    search, apply = kernels.op("swap_search"), kernels.op("swap_apply")
    rows = W.shape[0]
    keep = keep.clone()

    def residual(rows_=slice(None)):
        if target is None:
            return W[rows_] * ~keep[rows_]
        return target[rows_] - W[rows_] * keep[rows_]

    r = residual()
    c = r @ H
    row_loss = (r * c).sum(1)
    active = torch.arange(rows, device=W.device)
    steps = swaps = 0
    limit = max_swaps if max_swaps is not None else float("inf")
    bar = tqdm(desc="sparseswaps", unit="step", disable=not progress, leave=False)
    while active.numel() and steps < limit:
        if steps and steps % REFRESH_EVERY == 0:
            c[active] = residual(active) @ H
        u, p, delta = search(W, keep, c, H, prune_n, prune_m, rows=active)
        finite = torch.isfinite(delta)
        tol = _noise_floor(W, c, H, active, u, p)
        good = finite & (delta < -tol)
        active, u, p, delta = active[good], u[good], p[good], delta[good]
        apply(W, keep, c, H, active, u, p)
        row_loss[active] += delta
        steps += 1
        swaps += active.numel()
        bar.update(1)
        bar.set_postfix(active=active.numel())
    bar.close()
    return keep, {"steps": steps, "swaps": swaps, "converged": active.numel() == 0}


@legacy_positional(
    ("W", "H", "mask", "max_swaps", "backend"),
    tensor_or_none_at(2),
    "sparseswaps_layer(W, H, sparsity, prune_n, prune_m, mask=..., max_swaps=..., ...)",
)
@torch.no_grad()
def sparseswaps_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    *,
    mask: torch.Tensor | None = None,
    max_swaps: int | None = None,
    backend: str = "auto",
    reconstruct: bool = False,
    percdamp: float = DEFAULT_PERCDAMP,
    progress: bool = False,
    values: torch.Tensor | None = None,
    hinv: InverseHessian | None = None,
) -> PruneResult:
    """Refine a keep-mask (True = kept) by optimal 1-swaps; weights are not changed.

    `mask=None` warm-starts from Wanda's mask at `sparsity` / `prune_n:prune_m`. With
    `prune_n > 0` swaps stay inside each group of `prune_m` columns, so the N:M pattern is
    kept. `max_swaps` caps the number of steps (None: until no row improves). The loss
    (`r^T H r` summed over rows) never rises. `reconstruct=True` then runs SparseGPT's OBS
    updates on the final mask (`sparsegpt_layer(W, H, mask=...)`, with `hinv` if given) and
    returns those weights. `values`: the value each entry has while kept (default `W`), e.g.
    SparseGPT's updated weights where its mask keeps and `W` elsewhere; the loss is then that
    of the residual `D = W - values * mask` (`tr(D H D^T)`) and without `reconstruct` the
    result is `values * mask`. `info` has loss_before, loss_after, swaps, steps.
    """

    def check(W: torch.Tensor, H: torch.Tensor | None) -> None:
        nonlocal max_swaps
        if max_swaps is not None:
            max_swaps = check_int(max_swaps, "max_swaps", minimum=0)
        check_bool(reconstruct, "reconstruct")
        if values is not None:
            check_weight(values, "values")
            if values.shape != W.shape:
                raise ValueError(
                    f"values has shape {tuple(values.shape)} but W has {tuple(W.shape)}"
                )
            check_device(values, W.device, "values")
        check_given_mask(mask, W, prune_n, prune_m)

    def solve(p: Problem) -> Outcome:
        n, m, info = p.n, p.m, p.info
        Wc = p.W.to(p.dtype)
        Vc = Wc if values is None else p.like_w(values).to(p.dtype)
        Hc = p.H.to(p.dtype)
        Hc = (Hc + Hc.t()) / 2  # the algebra assumes a symmetric H; exact for one that is
        if mask is None:
            pruned = selection_prune_mask(wanda_score(p.W, p.H), p.sparsity, n, m, per_row=True)
            keep0, warm = ~pruned, "wanda"
        else:
            keep0, warm = mask, "given mask"
        info.update(sparsity=pruned_fraction(keep0), warm_start=warm)
        target = None if values is None else Wc

        def residual(keep):
            return Wc * ~keep if target is None else Wc - Vc * keep

        r0 = residual(keep0)
        loss_before = ((r0 @ Hc) * r0).sum(dtype=torch.float64).item()
        keep, counters = swap_refine(Vc, Hc, keep0, n, m, max_swaps, p.kernels, progress, target)
        r1 = residual(keep)
        loss_after = ((r1 @ Hc) * r1).sum(dtype=torch.float64).item()
        info.update(
            counters,
            loss_before=loss_before,
            loss_after=loss_after,
            max_swaps=max_swaps,
            pattern=pattern_name(n, m),
        )
        if not reconstruct:
            return Outcome(Vc.masked_fill(~keep, 0), keep, loss_after)
        rec = sparsegpt_layer(
            p.W, p.H, prune_n=n, prune_m=m, mask=keep, percdamp=percdamp, backend=backend,
            hinv=p.inverse(hinv),
        )  # fmt: skip
        info.update(
            reconstructed=True,
            loss_masked=loss_after,
            **{k: rec.info[k] for k in ("damp", "damp_retries")},
        )
        merge_kernel_info(info, rec.info)
        return Outcome(rec.weight, keep, rec.loss)

    return run_solver(
        "sparseswaps", W, H, sparsity, prune_n, prune_m, solve, backend=backend, ops=SWAP_OPS,
        check=check,
    )  # fmt: skip


# max_swaps="auto": as many steps as fit in a budget of pair evaluations per layer (a step
# evaluates rows x cols x cols pairs, N:M rows x cols x M), at least 1 and at most
# MAX_AUTO_SWAPS; each budget bounds a layer's swaps to a short time at the pair rates
# measured on CPU and GPU (benchmarks/bench_swap_search.py; docs/semantics.md has the rates
# and the times they give). Steps also end as soon as no row improves.
CPU_SWAP_PAIR_BUDGET = 3e8
GPU_SWAP_PAIR_BUDGET = 5e12
MAX_AUTO_SWAPS = 100


def auto_max_swaps(rows: int, cols: int, prune_m: int, device: torch.device) -> int | None:
    """The step budget of `max_swaps="auto"` for a layer on `device` (None: unbounded)."""
    if device.type not in ("cpu", "cuda"):
        return None
    budget = CPU_SWAP_PAIR_BUDGET if device.type == "cpu" else GPU_SWAP_PAIR_BUDGET
    pairs = rows * cols * (prune_m if prune_m else cols)
    return int(min(MAX_AUTO_SWAPS, max(1, budget // pairs)))


def check_max_swaps(opts: dict) -> dict:
    """`opts` with `max_swaps` checked: "auto", None or an int >= 0."""
    if opts["max_swaps"] not in ("auto", None):
        opts["max_swaps"] = check_int(opts["max_swaps"], "max_swaps", minimum=0)
    return opts


def auto_swaps_layer_options(W: torch.Tensor, prune_n: int, prune_m: int, kw: dict) -> dict:
    """A method's per-layer options with `max_swaps="auto"` resolved (`auto_max_swaps`)."""
    if kw["max_swaps"] == "auto":
        kw["max_swaps"] = auto_max_swaps(W.shape[0], W.shape[1], prune_m, W.device)
    return kw


def _check_options(opts: dict) -> dict:
    if opts["reconstruct"] not in (True, False):  # "best" is a composition's choice
        raise ValueError(
            f"reconstruct for method 'sparseswaps' is True or False, got {opts['reconstruct']!r}"
            " (reconstruct='best' is for a mask selector with refine='sparseswaps')"
        )
    return check_max_swaps(opts)


register(
    Method(
        "sparseswaps",
        sparseswaps_layer,
        "Wanda's mask refined by loss-reducing swaps, optionally OBS-reconstructed",
        {
            "max_swaps": "auto",
            **solver_defaults(sparseswaps_layer, "reconstruct", "percdamp", "backend"),
        },
        check=_check_options,
        layer_options=auto_swaps_layer_options,
        row_separable=lambda n, o: True,  # Wanda's per-row warm start, per-row swaps
    )
)
