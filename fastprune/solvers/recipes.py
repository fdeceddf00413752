"""Recipes: a mask selector, an optional mask refinement and an optional reconstruction
composed into one layer solve (`compose_layer`), and `fastprune_layer`, the composition that
pruned the built-in model best (see docs/recipes.md).

1. select: a registered mask selector (`registry.selectors()`: a method with a `Selection`
   hook; built in: magnitude, Wanda, GBLM, SparseGPT, ROSE) gives a mask and weights
   (SparseGPT and ROSE update the kept weights; the score methods keep `W`).
2. refine="sparseswaps": optimal 1-swaps per row, warm-started from that mask, with the kept
   entries fixed at `refine_on`'s values: "original" (`W`: the loss of `W * mask`) or
   "reconstructed" (the selector's weights where its mask keeps, `W` where it prunes: the
   loss of the selector's own result, lowered swap by swap). The two coincide for the score
   methods.
3. reconstruct=True: SparseGPT's OBS updates on the final mask from the original `W`
   (`sparsegpt_layer(W, H, mask=...)`, or the selector's own reconstruction hook: ROSE's runs
   in its column order); "best" keeps whichever of the refined and the
   reconstructed weights has the lower layer loss `tr(D H D^T)`; "best_rows" chooses row by
   row by the loss `d H d^T` (both have the same mask, and the layer loss is the sum of the
   rows', so this is never above either). "lstsq" instead solves for the least-squares
   weights on the final mask (`refit.refit_masked`: per row the minimum of the damped loss
   over the kept entries, which SparseGPT's column-by-column OBS updates do not reach).
   The recipe is the selector's mask with "lstsq" (docs/recipes.md has the measurements).

Every step treats each row on its own except a selection whose `row_separable` says no for
the pattern (magnitude's and SparseGPT's unstructured thresholds over all rows, ROSE's column
order from every row, which `rows=` takes from the whole layer): otherwise
`compose_layer(..., rows=slice)` is exactly those rows of the whole solve, unless
`reconstruct="best"` (chosen by the whole layer's loss).
"""

from __future__ import annotations

import inspect
import math
import time

import torch

from ..hessian import DEFAULT_PERCDAMP, InverseHessian, layer_loss, row_losses
from ..masks import pruned_fraction
from ..quant import QuantSpec, as_spec
from ..result import PruneResult
from ..validation import check_int, check_percdamp, check_rows, check_weight
from .core import merge_kernel_info
from .obs import DEFAULT_BLOCKSIZE
from .refit import refit_masked
from .registry import METHODS, get_method, selectors
from .skeleton import legacy_positional, tensor_or_none_at
from .sparsegpt import quantize_on_mask, sparsegpt_layer
from .sparseswaps import (
    sparseswaps_layer,
)

REFINERS = ("sparseswaps",)
REFINE_ON = ("original", "reconstructed")
RECONSTRUCT = (False, True, "best", "best_rows", "lstsq")
# the options that make a selector's method a composition (`composed`)
COMPOSE_OPTIONS = ("refine", "refine_on", "reconstruct")


def by_obs(reconstruct: object) -> bool:
    """Whether `reconstruct` asks for an OBS reconstruction (all but False and "lstsq")."""
    return bool(reconstruct) and reconstruct != "lstsq"


def check_recipe(
    select: object, refine: object, refine_on: object, reconstruct: object
) -> tuple[str, str | None, str, bool | str]:
    """The composition's choices checked (errors name the argument)."""
    if select not in selectors():
        raise ValueError(f"select must be one of {', '.join(selectors())}; got {select!r}")
    if refine is not None and refine not in REFINERS:
        raise ValueError(f"refine must be None or one of {', '.join(REFINERS)}; got {refine!r}")
    if refine_on not in REFINE_ON:
        raise ValueError(f"refine_on must be one of {', '.join(REFINE_ON)}; got {refine_on!r}")
    if not any(reconstruct is r or (isinstance(r, str) and reconstruct == r) for r in RECONSTRUCT):
        choices = ", ".join(map(repr, RECONSTRUCT))
        raise ValueError(f"reconstruct must be one of {choices}; got {reconstruct!r}")
    return select, refine, refine_on, reconstruct


def check_rounds(rounds: object, refine: object, reconstruct: object) -> int:
    """`rounds` checked: an integer >= 1, above 1 only with swaps and the least-squares refit
    (what the rounds alternate)."""
    rounds = check_int(rounds, "rounds", minimum=1)
    if rounds > 1 and (refine is None or reconstruct != "lstsq"):
        raise ValueError(
            "rounds > 1 alternates swaps and refits: it needs refine= and reconstruct='lstsq' "
            f"(got refine={refine!r}, reconstruct={reconstruct!r})"
        )
    return rounds


@legacy_positional(
    ("W", "H", "G"),
    tensor_or_none_at(2),
    "compose_layer(W, H, sparsity, prune_n, prune_m, G=G, select=..., ...)",
)
@torch.no_grad()
def compose_layer(
    W: torch.Tensor,
    H: torch.Tensor | None = None,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    *,
    G: torch.Tensor | None = None,
    select: str = "sparsegpt",
    refine: str | None = None,
    refine_on: str = "reconstructed",
    reconstruct: bool | str = False,
    max_swaps: int | None = None,
    refit_iters: int = 32,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    range_threshold: float = 0.5,
    alpha: float = 1.0,
    backend: str = "auto",
    hinv: InverseHessian | None = None,
    rows: slice | None = None,
    quant: QuantSpec | str | None = None,
    scaler: torch.Tensor | None = None,
    rounds: int = 1,
    damping_levels: tuple[float, ...] | None = None,
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PruneResult:
    """Prune one layer with `select`'s mask, optionally refined by `refine` and reconstructed
    (see the module docstring). `quant` (a `QuantSpec` or a preset name): the kept weights
    rounded in the selector's own sweep where its OBS weights are the result, else by an
    OBS sweep on the final mask from the final weights (`sparsegpt.quantize_on_mask`).
    `G`: the gradient norm, for a selector that needs gradients (GBLM) and only for it;
    `hinv` an inverse of `H` (`fastprune.inverse_hessian(H, percdamp)`) that the SparseGPT
    selection and the reconstruction reuse. `rows`: solve only these rows of `W` (and `G`),
    ROSE with the whole layer's column order. `info`: the selector's loss (`loss_selected`),
    the refinement's counters, which weights were kept (`result`: the selector's, "refined",
    "reconstructed" or, for "best_rows", "per row" with `rows_reconstructed`) and `recipe`.
    `scaler`: the running scaler of the layer's inputs, for a selector that takes one (ROSE's
    `score_scaler="running"`). `rounds` (with refine= and reconstruct="lstsq"): mask and
    weights alternated, each round the swaps scored on the previous round's refitted weights,
    then the refit on the new mask (`info["rounds"]`: the rounds run; fewer when a round's
    swaps change nothing). `damping_levels` with `held_out = (H_fit, H_held)`: the damping
    (`percdamp`) chosen per layer among these levels, the one whose solve on `H_fit` has the
    lowest loss under `H_held` (`held_out_damping`)."""
    if damping_levels is not None:
        opts = dict(G=G, select=select, refine=refine, refine_on=refine_on,
                    reconstruct=reconstruct, max_swaps=max_swaps, refit_iters=refit_iters,
                    blocksize=blocksize, range_threshold=range_threshold, alpha=alpha,
                    backend=backend, scaler=scaler, rounds=rounds)  # fmt: skip
        if rows is not None:
            raise ValueError("damping_levels chooses per layer: rows= cannot be solved apart")
        return held_out_damping(
            W, H, sparsity, prune_n, prune_m, damping_levels, held_out,
            percdamp=percdamp, hinv=hinv, quant=quant, **opts,
        )  # fmt: skip
    t0 = time.perf_counter()
    select, refine, refine_on, reconstruct = check_recipe(select, refine, refine_on, reconstruct)
    meth = get_method(select)
    spec = meth.select
    refit_iters = check_int(refit_iters, "refit_iters", minimum=0)
    rounds = check_rounds(rounds, refine, reconstruct)
    if scaler is not None and not spec.takes_scaler:
        raise ValueError(f"scaler is taken by a selector that scores with one, not {select!r}")
    W = check_weight(W)
    whole, whole_G = W, G
    if check_rows(rows) is not None:
        W = W[rows]
        G = None if G is None else G[rows]
    if H is None and (meth.needs_hessian or refine or reconstruct or quant is not None):
        raise ValueError(f"H is needed for select={select!r} with refine/reconstruct/quant")
    if (G is not None) != meth.needs_gradients:
        takes = " or ".join(repr(k) for k in selectors() if METHODS[k].needs_gradients)
        raise ValueError(f"G is needed for select={takes or None} and only for it")
    pat = {"sparsity": sparsity, "prune_n": prune_n, "prune_m": prune_m}
    obs = {"blocksize": blocksize, "percdamp": percdamp, "backend": backend}
    context = {**pat, **obs, "range_threshold": range_threshold, "alpha": alpha, "hinv": hinv}
    if scaler is not None:
        context["scaler"] = scaler
    qspec = as_spec(quant)
    # the selector's own sweep rounds the weights where they are the result
    joint = qspec is not None and spec.obs_weights and refine is None and reconstruct != "lstsq"
    if joint:
        context["quant"] = qspec

    def hook(fn, **extra) -> PruneResult:  # the selector's rows, or the layer and `rows`
        if spec.takes_rows:
            return fn(whole, H, G=whole_G, rows=rows, **context, **extra)
        return fn(W, H, G=G, rows=None, **context, **extra)

    sel = hook(spec.run)
    info = {"kernels": {}, **sel.info}  # a selector that runs no kernel may not say so
    recipe = {"select": select, "refine": refine, "refine_on": refine_on}
    info.update(recipe=recipe | {"reconstruct": reconstruct}, loss_selected=sel.loss)
    weight, mask, loss, result = sel.weight, sel.mask, sel.loss, select
    if refine is not None:
        values = None
        if refine_on == "reconstructed" and spec.obs_weights:
            values = torch.where(sel.mask, sel.weight, W)
        ref = sparseswaps_layer(
            W, H, prune_n=prune_n, prune_m=prune_m, mask=sel.mask, max_swaps=max_swaps,
            backend=backend, percdamp=percdamp, values=values,
        )  # fmt: skip
        weight, mask, loss, result = ref.weight, ref.mask, ref.info["loss_after"], "refined"
        for k in ("swaps", "steps", "converged", "max_swaps", "loss_before", "loss_after"):
            info[f"refine_{k}"] = ref.info[k]
        merge_kernel_info(info, ref.info)
    # an OBS selector's own weights are already the reconstruction on its mask; "lstsq" solves
    # for the optimum itself (an OBS start converges no faster)
    if by_obs(reconstruct) and (refine is not None or not spec.obs_weights):
        if spec.reconstruct is not None:  # the selector's own (ROSE: in its column order)
            rec = hook(spec.reconstruct, mask=mask)
        else:
            rec = sparsegpt_layer(
                W, H, mask=mask, prune_n=prune_n, prune_m=prune_m, **obs, hinv=hinv
            )
        info["loss_reconstructed"] = rec.loss
        merge_kernel_info(info, rec.info)
        if reconstruct is True or (reconstruct == "best" and rec.loss < loss):
            weight, loss, result = rec.weight, rec.loss, "reconstructed"
        elif reconstruct == "best_rows":
            weight, loss, result, info["rows_reconstructed"] = _best_rows(
                W, H, weight, rec.weight, result
            )
    if reconstruct == "lstsq":
        weight, refit = refit_masked(W, H, mask, weight, percdamp=percdamp, iters=refit_iters)
        info.update(refit, loss_before_refit=loss)
        loss, result = layer_loss(W, weight, H), "refit"
        if rounds > 1:
            weight, mask, loss, info["rounds"] = _alternate(
                W, H, weight, mask, loss, rounds, info, prune_n=prune_n, prune_m=prune_m,
                max_swaps=max_swaps, backend=backend, percdamp=percdamp, refit_iters=refit_iters,
            )  # fmt: skip
    qw = sel.quant if joint else None
    if qspec is not None and not joint:  # round the final weights on the final mask
        final = quantize_on_mask(W, H, weight, mask, qspec, prune_n, prune_m, hinv=hinv, **obs)
        merge_kernel_info(info, final.info)
        info.update(loss_before_quant=loss, quant=final.info["quant"])
        weight, qw, loss = final.weight, final.quant, final.loss
    info.update(method="compose", result=result)
    info["achieved_sparsity"] = pruned_fraction(mask)
    info["seconds"] = time.perf_counter() - t0
    return PruneResult(weight.to(W.dtype), mask, loss, info, qw)


# damping chosen per layer (`damping_levels`): every this-many-th calibration batch is the
# held-out slice (a quarter of the samples at batch size 1), interleaved so that it spans the
# calibration text rather than one end of it
HELD_OUT_EVERY = 4
# the trial solves of `held_out_damping` stop their refit here: they only rank the levels
# (on 12 layers of SmolLM2-135M at 50% the ranking after 8 iterations chose the level that
# 32 chose on 11, at 0.4x the cost; docs/recipes.md)
HELD_OUT_REFIT_ITERS = 8


def check_damping_levels(levels) -> tuple[float, ...] | None:
    """`damping_levels`: None, or a non-empty sequence of distinct damping fractions, each a
    valid `percdamp`, returned sorted as a tuple of floats."""
    if levels is None:
        return None
    if isinstance(levels, str | bytes) or not hasattr(levels, "__iter__"):
        raise TypeError(f"damping_levels must be a sequence of floats, got {levels!r}")
    out = tuple(sorted({check_percdamp(float(d)) for d in levels}))
    if not out:
        raise ValueError("damping_levels must name at least one level")
    return out


def held_out_damping(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    prune_n: int,
    prune_m: int,
    levels,
    held_out: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    percdamp: float = DEFAULT_PERCDAMP,
    hinv: InverseHessian | None = None,
    quant: QuantSpec | str | None = None,
    trial_iters: int = HELD_OUT_REFIT_ITERS,
    **opts,
) -> PruneResult:
    """`compose_layer` with its damping chosen on held-out samples: each level `d` of
    `levels` solves the layer on `H_fit` (the Hessian of the calibration samples outside the
    held-out slice; a least-squares refit stopped at `trial_iters` iterations) and
    is scored by its loss `tr(D H_held D^T)` on the slice; the level with the lowest such
    loss then solves on `H` (all samples, every iteration). Why: the damping is a ridge toward
    `W` whose best strength varies by layer, and the held-out loss measures how well a solve
    carries beyond the samples it fitted. `held_out` None (no held-out samples reached the
    layer) keeps `percdamp`. `info`: `percdamp_chosen` and `held_out_losses` ({level:
    loss}), or `held_out: "none"`."""
    t0 = time.perf_counter()
    levels = check_damping_levels(levels)
    if held_out is None:
        r = compose_layer(W, H, sparsity, prune_n, prune_m, percdamp=percdamp, hinv=hinv,
                          quant=quant, **opts)  # fmt: skip
        r.info.update(percdamp_chosen=percdamp, held_out="none")
        return r
    H_fit, H_held = held_out
    for name, M in (("H_fit", H_fit), ("H_held", H_held)):
        if not isinstance(M, torch.Tensor) or M.shape != H.shape:
            raise ValueError(f"held_out's {name} must be a tensor of H's shape {tuple(H.shape)}")
    W = check_weight(W)
    scores = {}
    trial = {**opts, "refit_iters": min(opts.get("refit_iters", 32), trial_iters)}
    for d in levels:
        r = compose_layer(W, H_fit, sparsity, prune_n, prune_m, percdamp=d, **trial)
        scores[d] = layer_loss(W, r.weight, H_held)
    finite = {d: v for d, v in scores.items() if math.isfinite(v)}
    best = min(finite, key=finite.get) if finite else percdamp
    shared = hinv if best == percdamp else None  # the shared inverse is percdamp's
    r = compose_layer(W, H, sparsity, prune_n, prune_m, percdamp=best, hinv=shared, quant=quant,
                      **opts)  # fmt: skip
    r.info.update(percdamp_chosen=best, held_out_losses=scores)
    r.info["seconds"] = time.perf_counter() - t0
    return r


def _alternate(W, H, weight, mask, loss, rounds, info, *, refit_iters, percdamp, **swaps):
    """Rounds 2.. of `rounds`: swaps scored on the refitted weights, then the refit on the new
    mask; a round whose loss is not lower is undone and ends the loop. Returns (weights, mask,
    loss, rounds run)."""
    done = 1
    for _ in range(rounds - 1):
        values = torch.where(mask, weight, W)
        ref = sparseswaps_layer(W, H, mask=mask, percdamp=percdamp, values=values, **swaps)
        if ref.info["swaps"] == 0:
            break
        new, _ = refit_masked(W, H, ref.mask, ref.weight, percdamp=percdamp, iters=refit_iters)
        new_loss = layer_loss(W, new, H)
        if not new_loss < loss:
            break
        # only a kept round's swaps count: a rejected round leaves the mask as it was
        info["refine_swaps"] = info.get("refine_swaps", 0) + ref.info["swaps"]
        weight, mask, loss, done = new, ref.mask, new_loss, done + 1
    return weight, mask, loss, done


def _best_rows(
    W: torch.Tensor, H: torch.Tensor, kept: torch.Tensor, rec: torch.Tensor, name: str
) -> tuple[torch.Tensor, float, str, int]:
    """reconstruct="best_rows": per row the lower loss `d H d^T` (`d = w - row`) of `kept` and
    `rec`; (weights, their layer loss, what was kept, how many rows come from `rec`)."""
    lk, lr = row_losses(W, kept, H), row_losses(W, rec, H)
    take = lr < lk
    count = int(take.sum().item())
    loss = float(torch.where(take, lr, lk).sum().item())
    if count == 0:
        return kept, loss, name, 0
    if count == take.numel():
        return rec, loss, "reconstructed", count
    weight = torch.where(take[:, None], rec.to(kept.dtype), kept)
    return weight, loss, "per row", count


# SparseSwaps steps when the recipe is asked to refine (`refine="sparseswaps"`): at most this
# many per layer (and at most the budget of `max_swaps="auto"` in the pipeline), by pattern;
# docs/recipes.md has the measurements that chose them (at 2:4 more steps fitted the
# calibration text better and the other texts worse; at 4:8 the 16 steps were better
# everywhere).
RECIPE_MAX_SWAPS = 16
RECIPE_MAX_SWAPS_BY_PATTERN = {"2:4": 4}
# the recipe's composition (`method="fastprune"` in the pipeline) and `fastprune_layer`'s
# defaults: the selector's mask (ROSE for N:M, SparseGPT unstructured) with the least-squares
# weights on it. Swaps before the refit gained nothing on the texts the calibration never saw
# and cost time (docs/recipes.md has the measurements), so the recipe does not refine by
# default.
RECIPE = {
    "select": "auto",
    "refine": None,
    "refine_on": "reconstructed",
    "reconstruct": "lstsq",
}
RECIPE_DEFAULTS = {**RECIPE, "max_swaps": "auto"}


def recipe_max_swaps(prune_n: int, prune_m: int) -> int:
    """The recipe's cap on swap steps (when it refines) for a pattern: 4 at 2:4, else
    `RECIPE_MAX_SWAPS`."""
    name = f"{prune_n}:{prune_m}" if prune_n else "unstructured"
    return RECIPE_MAX_SWAPS_BY_PATTERN.get(name, RECIPE_MAX_SWAPS)


def fastprune_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    **options,
) -> PruneResult:
    """fastprune's recipe on one layer: `compose_layer` with the recipe's composition
    (`RECIPE`: the selector's mask, `select="auto"` being ROSE for N:M and SparseGPT
    unstructured, with the least-squares weights on it, `reconstruct="lstsq"`). With
    `refine="sparseswaps"` the swaps take at most `recipe_max_swaps(prune_n, prune_m)` steps
    (`max_swaps="auto"`). `options`: any of `compose_layer`'s keywords (blocksize, percdamp,
    refit_iters, backend, hinv, rows, ...), overriding those defaults."""
    fastprune_layer.__signature__.bind(W, H, sparsity, prune_n, prune_m, **options)
    opts = {**RECIPE_DEFAULTS, **options}
    if opts["select"] == "auto":
        opts["select"] = recipe_selector(prune_n)
    if opts["max_swaps"] == "auto":
        opts["max_swaps"] = recipe_max_swaps(prune_n, prune_m)
    return compose_layer(W, H, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m, **opts)


def _recipe_signature() -> inspect.Signature:
    """`fastprune_layer`'s signature as callers and `help()` see it: its five leading
    arguments, then `compose_layer`'s keywords with the recipe's defaults."""
    lead = list(inspect.signature(fastprune_layer).parameters.values())[:5]
    comp = inspect.signature(compose_layer)
    rest = [
        p.replace(default=RECIPE_DEFAULTS.get(name, p.default))
        for name, p in comp.parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in ("sparsity", "prune_n", "prune_m")
    ]
    return inspect.Signature(lead + rest, return_annotation=comp.return_annotation)


fastprune_layer.__signature__ = _recipe_signature()


def recipe_selector(prune_n: int) -> str:
    """The recipe's `select="auto"`: ROSE for N:M (it reorders the groups there), SparseGPT
    unstructured; docs/recipes.md has the measurements that chose them."""
    return "rose" if prune_n else "sparsegpt"
