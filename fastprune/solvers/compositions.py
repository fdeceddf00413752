"""Compositions as methods: `composed` turns a registered mask selector into a method that
refines and/or reconstructs its mask (`compose_layer`), and the recipe registers itself as
method "fastprune" (`fastprune_layer`)."""

from __future__ import annotations

import inspect

import torch

from ..validation import check_int
from .core import active_world
from .recipes import (
    COMPOSE_OPTIONS,
    HELD_OUT_EVERY,
    RECIPE_DEFAULTS,
    by_obs,
    check_damping_levels,
    check_recipe,
    check_rounds,
    compose_layer,
    fastprune_layer,
    recipe_max_swaps,
    recipe_selector,
)
from .registry import Method, Selection, get_method, register, solver_defaults
from .sparseswaps import auto_max_swaps, auto_swaps_layer_options, check_max_swaps


def _selection(select: str, prune_n: int) -> Selection:
    """The selection hook of `select` ("auto": the recipe's selector for the pattern)."""
    return get_method(recipe_selector(prune_n) if select == "auto" else select).select


def _reads_inverse(spec: Selection) -> bool:
    """Whether a composition selecting with `spec` reads the shared inverse of H: all but
    those whose selection and reconstruction factor their own H (ROSE's permuted one)."""
    return spec.reads_inverse or spec.reconstruct is None


def _separable(spec: Selection, prune_n: int, opts) -> bool:
    """A composition's `row_separable`: its selection's, unless "best", rounds (each
    accepted by the layer's loss) or damping levels (chosen by it) compare the layer."""
    return (
        spec.row_separable(prune_n)
        and opts.get("reconstruct") != "best"
        and opts.get("rounds", 1) == 1
        and opts.get("damping_levels") is None
    )


def _reads_held_out(opts) -> bool:
    return opts.get("damping_levels") is not None


def _check_steps(opts: dict) -> dict:
    opts["refit_iters"] = check_int(opts["refit_iters"], "refit_iters", minimum=0)
    opts["rounds"] = check_rounds(opts["rounds"], opts["refine"], opts["reconstruct"])
    opts["damping_levels"] = check_damping_levels(opts["damping_levels"])
    if opts["damping_levels"] is not None and active_world() > 1:
        raise ValueError(
            f"damping_levels holds out every {HELD_OUT_EVERY}th calibration batch of the whole "
            "calibration, which ranks holding shards of the samples do not see: run it in one "
            "process (not under torch.distributed)"
        )
    return check_max_swaps(opts)


def composed(base: Method, options) -> Method:
    """`base` (a mask selector: a method with a `select` hook) with a refinement and/or a
    reconstruction (`compose_layer`), when `options` ask for one; else `base`. Named after
    its parts, e.g. "wanda+sparseswaps+reconstruct"."""
    if base.select is None or not any(k in options for k in COMPOSE_OPTIONS):
        return base
    refine, reconstruct = options.get("refine"), options.get("reconstruct", False)
    name = base.name + (f"+{refine}" if refine else "")
    name += "" if not reconstruct else "+reconstruct" if reconstruct is True else f"+{reconstruct}"
    extra = {
        **solver_defaults(compose_layer, *COMPOSE_OPTIONS),
        "max_swaps": "auto",
        **solver_defaults(
            compose_layer, "refit_iters", "rounds", "damping_levels", "percdamp", "backend"
        ),
    }
    opts = dict(base.options) | {k: v for k, v in extra.items() if k not in base.options}
    takes = inspect.signature(compose_layer).parameters
    stray = [k for k in base.solver_options if k not in takes]
    if stray:
        raise TypeError(f"{base.name}'s option {stray[0]} does not reach compose_layer's selection")

    def check(o: dict) -> dict:
        o = base.check(o) if base.check is not None else o
        check_recipe(base.name, o["refine"], o["refine_on"], o["reconstruct"])
        return _check_steps(o)

    def solver(W, H, sparsity, prune_n, prune_m, **kw):
        return compose_layer(W, H, sparsity, prune_n, prune_m, select=base.name, **kw)

    return Method(
        name,
        solver,
        f"{base.name}'s mask, refined/reconstructed (fastprune.compose_layer)",
        opts,
        needs_hessian=True,
        needs_gradients=base.needs_gradients,
        # the inverse serves an OBS selection that reads it (SparseGPT's) and the natural-order
        # OBS reconstruction ("lstsq" solves with H, not its inverse)
        shares_inverse=base.select.reads_inverse or by_obs(reconstruct),
        uses_inverse=lambda n, o: _reads_inverse(base.select),
        pipeline_options=base.pipeline_options,
        check=check,
        layer_options=auto_swaps_layer_options,
        row_separable=lambda n, o: _separable(base.select, n, o),
        takes_rows=True,
        takes_quant=True,  # compose_layer(quant=): the OBS sweep on the final mask rounds
        reads_scaler=base.reads_scaler,  # ROSE's running scaler reaches its selection
        reads_held_out=_reads_held_out,
    )


def _check_options(opts: dict) -> dict:
    select = recipe_selector(0) if opts["select"] == "auto" else opts["select"]
    check_recipe(select, opts["refine"], opts["refine_on"], opts["reconstruct"])
    if get_method(select).needs_gradients:
        raise ValueError(
            f"select={select!r} needs gradients: use method={select!r} with refine=/reconstruct= "
            "instead"
        )
    return _check_steps(opts)


def _layer_options(W: torch.Tensor, prune_n: int, prune_m: int, kw: dict) -> dict:
    """fastprune's "auto": the SparseSwaps budget, capped at the recipe's step count for the
    pattern (`recipe_max_swaps`)."""
    if kw["max_swaps"] == "auto":
        cap = recipe_max_swaps(prune_n, prune_m)
        steps = auto_max_swaps(W.shape[0], W.shape[1], prune_m, W.device)
        kw["max_swaps"] = cap if steps is None else min(steps, cap)
    return kw


register(
    Method(
        "fastprune",
        fastprune_layer,
        "fastprune's recipe: SparseGPT's mask (ROSE's for N:M) with the least-squares "
        "weights on it (see docs/recipes.md)",
        {
            **RECIPE_DEFAULTS,
            **solver_defaults(
                compose_layer,
                "refit_iters",
                "rounds",
                "damping_levels",
                "blocksize",
                "percdamp",
                "range_threshold",
                "backend",
            ),  # fmt: skip
        },
        shares_inverse=True,
        uses_inverse=lambda n, o: _reads_inverse(_selection(o["select"], n)),
        check=_check_options,
        layer_options=_layer_options,
        row_separable=lambda n, o: _separable(_selection(o["select"], n), n, o),
        takes_rows=True,
        takes_quant=True,
        reads_held_out=_reads_held_out,
    )
)
