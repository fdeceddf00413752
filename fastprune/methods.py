"""The one registry of pruning methods, `METHODS`, that `prune_model` and the CLI use.

Each `Method` names its layer solver, the model-level options it takes (with defaults), what
the pipeline must give it (a Hessian, gradients, a shared inverse) and how the pipeline's
arguments become a solver call. Adding a method is one entry here: `prune_model` accepts it,
the CLI offers it, and the CLI's option flags (`--backend`, `--max-swaps`, ...) reach it
when it declares the option.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .result import PruneResult
from .solvers.gblm import gblm_layer
from .solvers.magnitude import magnitude_layer
from .solvers.recipes import (
    RECIPE,
    SELECTORS,
    check_recipe,
    compose_layer,
    fastprune_layer,
    recipe_max_swaps,
    recipe_selector,
)
from .solvers.rose import rose_layer
from .solvers.sparsegpt import sparsegpt_layer
from .solvers.sparsegpt_batched import sparsegpt_experts
from .solvers.sparseswaps import sparseswaps_layer
from .solvers.wanda import wanda_layer
from .validation import check_int

# Options the pipeline consumes itself for a method that needs gradients (GBLM's `G`):
# precomputed {name: G}, else computed with this norm and scale.
GRADIENT_OPTIONS = ("gradients", "norm", "scale")
# on CPU, experts of at most this many weights are solved as a batch (bench_experts_batch,
# 2 cores, SparseGPT with its inverses, batched vs one by one: 64 experts of 64x256 3.8x
# faster, 16 of 2048x768 1.07x, 16 of 1536x2048 0.67x: batched LAPACK and thin batched GEMMs
# lose to large single ones once the Python loop over columns no longer dominates)
BATCH_MAX_ENTRIES = 1 << 21


@dataclass(frozen=True)
class Method:
    """One pruning method as the model pipeline runs it.

    `solver(W, H, sparsity, prune_n, prune_m, **solver options)`: `H` is None unless
    `needs_hessian`; `G=` is passed when `needs_gradients`. `options`: the model-level options and
    their defaults; all but `pipeline_options` go to the solver as keywords (after
    `layer_options` rewrites them per layer, e.g. SparseSwaps' `max_swaps="auto"`).
    `shares_inverse`: layers fed the same input (q/k/v, gate/up) are solved with one inverse
    Hessian (`inverse_hessian(H, percdamp)`, passed as `hinv=`). `check` validates and
    normalises a full option dict (errors name the option). `row_separable(prune_n, options)`:
    whether the solve of any rows of a layer (the same `H`, those rows of `G`) equals those
    rows of the whole layer's solve, so a distributed prune may split a layer's rows across
    ranks (None: never).
    """

    name: str
    solver: Callable[..., PruneResult]
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    needs_hessian: bool = True
    needs_gradients: bool = False
    shares_inverse: bool = False
    # of a `shares_inverse` method, whether a solve with (prune_n, options) reads the shared
    # inverse at all (None: always); a recipe selecting with ROSE factors its own permuted H
    uses_inverse: Callable[[int, Mapping[str, Any]], bool] | None = None
    pipeline_options: tuple[str, ...] = ()
    check: Callable[[dict], dict] | None = None
    layer_options: Callable[[torch.Tensor, int, int, dict], dict] | None = None
    row_separable: Callable[[int, Mapping[str, Any]], bool] | None = None
    takes_rows: bool = False  # the solver slices rows itself (`rows=`: ROSE's column order)
    # the solver reads only diag(H) (Wanda, GBLM): a pipeline may accumulate that alone
    reads_diagonal: bool = False
    # solves a batch of same-shaped layers at once (MoE experts): `batch_solver(W [E, r, c],
    # H [E, c, c], sparsity, prune_n, prune_m, **solver options, hinvs=)` -> [PruneResult]
    batch_solver: Callable[..., list[PruneResult]] | None = None

    def separable(self, prune_n: int, options: Mapping[str, Any]) -> bool:
        """Whether this method's layers may be solved in row slices (see `row_separable`)."""
        return self.row_separable is not None and self.row_separable(prune_n, options)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if self.needs_gradients:
            missing = [k for k in GRADIENT_OPTIONS if k not in self.pipeline_options]
            if missing:
                raise ValueError(
                    f"method {self.name!r} needs gradients: it must declare the pipeline "
                    f"options {', '.join(GRADIENT_OPTIONS)}"
                )
        if self.shares_inverse and "percdamp" not in self.options:
            raise ValueError(f"method {self.name!r} shares inverses: it needs a percdamp option")
        stray = [k for k in self.pipeline_options if k not in self.options]
        if stray:
            raise ValueError(f"method {self.name!r}: pipeline option {stray[0]} is not an option")

    @property
    def needs_calibration(self) -> bool:
        return self.needs_hessian or self.needs_gradients

    @property
    def solver_options(self) -> tuple[str, ...]:
        """The options passed to the solver as keywords."""
        return tuple(k for k in self.options if k not in self.pipeline_options)

    def check_options(self, options: Mapping[str, Any]) -> dict:
        """The defaults updated with `options`; `TypeError` for an option this method does not
        take, `ValueError`/`TypeError` from `check` for a bad value."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) or "no options"
            raise TypeError(
                f"method {self.name!r} does not take {', '.join(unknown)}; it takes {takes}"
            )
        opts = dict(self.options)
        opts.update(options)
        return self.check(opts) if self.check is not None else opts

    def solve(
        self,
        W: torch.Tensor,
        H: torch.Tensor | None,
        G: torch.Tensor | None,
        sparsity: float,
        prune_n: int,
        prune_m: int,
        options: Mapping[str, Any],
        hinv=None,
        rows: slice | None = None,
    ) -> PruneResult:
        """One layer: `options` as returned by `check_options`; `hinv` the shared inverse
        (only for `shares_inverse` methods, None to let the solver compute it). `rows`: solve
        only these rows of `W` (and `G`), for a `separable` method; per-layer options (the
        swap budget) are still those of the whole layer."""
        kw = {k: options[k] for k in self.solver_options}
        if self.layer_options is not None:
            kw = self.layer_options(W, prune_n, prune_m, kw)
        if rows is not None:
            if not self.separable(prune_n, options):
                raise ValueError(f"method {self.name!r} cannot solve a layer's rows separately")
            if self.takes_rows:
                kw["rows"] = rows
            else:
                W = W[rows]
                G = None if G is None else G[rows]
        if self.needs_gradients:
            kw["G"] = G.to(W.device)
        if self.shares_inverse:
            kw["hinv"] = hinv
        H = H if self.needs_hessian else None
        return self.solver(W, H, sparsity, prune_n, prune_m, **kw)

    def wants_inverse(self, prune_n: int, options: Mapping[str, Any]) -> bool:
        """Whether the pipeline should factor the shared inverse for a solve with these
        options (`shares_inverse`, and `uses_inverse` where the method has one)."""
        if not self.shares_inverse:
            return False
        return self.uses_inverse is None or self.uses_inverse(prune_n, options)

    def batches(self, options: Mapping[str, Any], device: torch.device, shape) -> bool:
        """Whether same-shaped layers (a projection's experts, `shape` = (rows, cols)) are
        solved as one batch here: the method has a batch solver (the ops' batched forms,
        on the backend dispatch picks) and, on CPU, the layers are small enough for the
        Python loop over columns to dominate (`BATCH_MAX_ENTRIES`;
        `benchmarks/bench_experts_batch.py` measured it)."""
        backend = options.get("backend", "auto")
        if self.batch_solver is None:
            return False
        if device.type == "cpu":  # Triton asked for on CPU: the single path says why not
            return backend in ("auto", "torch") and shape[0] * shape[1] <= BATCH_MAX_ENTRIES
        return True

    def solve_batch(self, W, H, sparsity, prune_n, prune_m, options, hinvs=None):
        """Layers `W [E, rows, cols]` with Hessians `H` (`[E, cols, cols]` or E `[cols, cols]`
        tensors) and their inverses `hinvs`, solved together: one `PruneResult` per layer."""
        kw = {k: options[k] for k in self.solver_options}
        return self.batch_solver(W, H, sparsity, prune_n, prune_m, **kw, hinvs=hinvs)


COMPOSE_OPTIONS = ("refine", "refine_on", "reconstruct")


def composed(base: Method, options: Mapping[str, Any]) -> Method:
    """`base` (a mask selector: magnitude, wanda, gblm, sparsegpt, rose) with a refinement
    and/or a reconstruction (`fastprune.compose_layer`), when `options` ask for one; else
    `base`. Named after its parts, e.g. "wanda+sparseswaps+reconstruct"."""
    if base.name not in SELECTORS or not any(k in options for k in COMPOSE_OPTIONS):
        return base
    refine, reconstruct = options.get("refine"), options.get("reconstruct", False)
    name = base.name + (f"+{refine}" if refine else "")
    name += "" if not reconstruct else "+reconstruct" if reconstruct is True else f"+{reconstruct}"
    extra = {"refine": None, "refine_on": "reconstructed", "reconstruct": False}
    extra |= {"max_swaps": "auto", "refit_iters": 32, "percdamp": 0.01, "backend": "auto"}
    opts = dict(base.options) | {k: v for k, v in extra.items() if k not in base.options}

    def check(o: dict) -> dict:
        o = base.check(o) if base.check is not None else o
        check_recipe(base.name, o["refine"], o["refine_on"], o["reconstruct"])
        o["refit_iters"] = check_int(o["refit_iters"], "refit_iters", minimum=0)
        return _check_sparseswaps(o)

    def solver(W, H, sparsity, prune_n, prune_m, **kw):
        return compose_layer(W, H, sparsity, prune_n, prune_m, select=base.name, **kw)

    return Method(
        name,
        solver,
        f"{base.name}'s mask, refined/reconstructed (fastprune.compose_layer)",
        opts,
        needs_hessian=True,
        needs_gradients=base.needs_gradients,
        # the inverse serves SparseGPT's selection and the natural-order OBS reconstruction
        # (after ROSE's selection the reconstruction factors ROSE's permuted H itself;
        # "lstsq" solves with H, not its inverse)
        shares_inverse=base.name == "sparsegpt" or reconstruct not in (False, "lstsq"),
        uses_inverse=lambda n, o: _selector_reads_inverse(base.name, n),
        pipeline_options=base.pipeline_options,
        check=check,
        layer_options=_sparseswaps_layer_options,
        row_separable=lambda n, o: _composition_separable(base.name, n, o),
        takes_rows=True,
    )


def get_method(name) -> Method:
    """`METHODS[name]`, or a `ValueError` listing the methods."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {name!r}")
    return METHODS[name]


def methods_with(option: str) -> list[str]:
    """The methods that take `option` (for the CLI's flags and help)."""
    return [k for k, m in METHODS.items() if option in m.options]


# ---------------------------------------------------------------------- per-method rules


def _check_gblm(opts: dict) -> dict:
    if opts["norm"] not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {opts['norm']!r}")
    return opts


def _check_recipe(opts: dict) -> dict:
    if opts["select"] == "gblm":
        raise ValueError(
            "select='gblm' needs gradients: use method='gblm' with refine=/reconstruct= instead"
        )
    select = "sparsegpt" if opts["select"] == "auto" else opts["select"]
    check_recipe(select, opts["refine"], opts["refine_on"], opts["reconstruct"])
    opts["refit_iters"] = check_int(opts["refit_iters"], "refit_iters", minimum=0)
    return _check_sparseswaps(opts)


# Row-separable mask selectors: per output row (Wanda, GBLM) or per N:M group (ROSE with the
# whole layer's column order, which its solver takes itself). A layer-wide threshold
# (magnitude, SparseGPT's per-block threshold over all rows) couples the rows. SparseSwaps, an
# OBS reconstruction on a fixed mask and reconstruct="best_rows" treat each row alone;
# reconstruct="best" chooses by the whole layer's loss.
_SEPARABLE_SELECTORS = {
    "magnitude": lambda n: n > 0,
    "wanda": lambda n: True,
    "gblm": lambda n: True,
    "sparsegpt": lambda n: n > 0,
    "rose": lambda n: n > 0,
}


def _selector_separable(name: str) -> Callable[[int, Mapping[str, Any]], bool]:
    """A selector method's `row_separable`, from `_SEPARABLE_SELECTORS`."""
    return lambda prune_n, opts: _SEPARABLE_SELECTORS[name](prune_n)


def _selector_reads_inverse(select: str, prune_n: int) -> bool:
    """Whether a composition selecting with `select` ("auto": the recipe's choice for the
    pattern) reads the shared inverse of H: all but ROSE's, whose selection and
    reconstruction factor its own permuted H."""
    return (recipe_selector(prune_n) if select == "auto" else select) != "rose"


def _composition_separable(select: str, prune_n: int, opts: Mapping[str, Any]) -> bool:
    select = recipe_selector(prune_n) if select == "auto" else select
    return _SEPARABLE_SELECTORS[select](prune_n) and opts.get("reconstruct") != "best"


def _check_sparseswaps(opts: dict) -> dict:
    if opts["max_swaps"] not in ("auto", None):
        opts["max_swaps"] = check_int(opts["max_swaps"], "max_swaps", minimum=0)
    return opts


def _check_sparseswaps_method(opts: dict) -> dict:
    if opts["reconstruct"] not in (True, False):  # "best" is a composition's choice
        raise ValueError(
            f"reconstruct for method 'sparseswaps' is True or False, got {opts['reconstruct']!r}"
            " (reconstruct='best' is for a mask selector with refine='sparseswaps')"
        )
    return _check_sparseswaps(opts)


# max_swaps="auto": as many SparseSwaps steps as fit in a budget of pair evaluations per
# layer (a step evaluates rows x cols x cols pairs, N:M rows x cols x M), at least 1 and at
# most MAX_AUTO_SWAPS. CPU: the torch reference scans ~0.2e9 pairs/s on two cores, so 3e8 is
# ~2 s a layer. GPU: the fused search evaluated 2.4e12 pairs/s on an H100 (2048x2048), so
# 5e12 is ~2 s a layer (a 4096x4096 layer: 72 steps; 4096x11008: 10), ~8 min for the 224
# layers of a 7B model at most. Steps also end as soon as no row improves.
CPU_SWAP_PAIR_BUDGET = 3e8
GPU_SWAP_PAIR_BUDGET = 5e12
MAX_AUTO_SWAPS = 100


def auto_max_swaps(rows: int, cols: int, prune_m: int, device: torch.device) -> int | None:
    if device.type not in ("cpu", "cuda"):
        return None
    budget = CPU_SWAP_PAIR_BUDGET if device.type == "cpu" else GPU_SWAP_PAIR_BUDGET
    pairs = rows * cols * (prune_m if prune_m else cols)
    return int(min(MAX_AUTO_SWAPS, max(1, budget // pairs)))


def _sparseswaps_layer_options(W: torch.Tensor, prune_n: int, prune_m: int, kw: dict) -> dict:
    if kw["max_swaps"] == "auto":
        kw["max_swaps"] = auto_max_swaps(W.shape[0], W.shape[1], prune_m, W.device)
    return kw


def _recipe_layer_options(W: torch.Tensor, prune_n: int, prune_m: int, kw: dict) -> dict:
    """fastprune's "auto": the SparseSwaps budget, capped at the recipe's step count for the
    pattern (`recipe_max_swaps`)."""
    if kw["max_swaps"] == "auto":
        cap = recipe_max_swaps(prune_n, prune_m)
        steps = auto_max_swaps(W.shape[0], W.shape[1], prune_m, W.device)
        kw["max_swaps"] = cap if steps is None else min(steps, cap)
    return kw


# ---------------------------------------------------------------------------- the registry

_OBS = {"blocksize": 128, "percdamp": 0.01}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "magnitude",
            magnitude_layer,
            "|W|; one threshold over the whole layer (no calibration)",
            needs_hessian=False,
            row_separable=_selector_separable("magnitude"),
        ),
        Method(
            "wanda",
            wanda_layer,
            "|W| * sqrt(diag(H)/2), per output row",
            row_separable=_selector_separable("wanda"),
            reads_diagonal=True,
        ),
        Method(
            "sparsegpt",
            sparsegpt_layer,
            "OBS pruning with weight updates (IST-DASLab SparseGPT)",
            {**_OBS, "backend": "auto"},
            shares_inverse=True,
            batch_solver=sparsegpt_experts,
            row_separable=_selector_separable("sparsegpt"),
        ),
        Method(
            "rose",
            rose_layer,
            "SparseGPT on a loss-reordered layer where the layer is columnar (ROSE)",
            {**_OBS, "range_threshold": 0.5, "backend": "auto"},
            row_separable=_selector_separable("rose"),
            takes_rows=True,
        ),
        Method(
            "gblm",
            gblm_layer,
            "Wanda's score + alpha * |W| * gradient norm (GBLM-Pruner)",
            {"alpha": 1.0, "norm": "l2", "scale": 100.0, "gradients": None},
            needs_gradients=True,
            pipeline_options=GRADIENT_OPTIONS,
            check=_check_gblm,
            row_separable=_selector_separable("gblm"),
            reads_diagonal=True,
        ),
        Method(
            "sparseswaps",
            sparseswaps_layer,
            "Wanda's mask refined by loss-reducing swaps, optionally OBS-reconstructed",
            {"max_swaps": "auto", "reconstruct": False, "percdamp": 0.01, "backend": "auto"},
            check=_check_sparseswaps_method,
            layer_options=_sparseswaps_layer_options,
            row_separable=lambda n, o: True,  # Wanda's per-row warm start, per-row swaps
        ),
        Method(
            "fastprune",
            fastprune_layer,
            "fastprune's recipe: SparseGPT's mask (ROSE's for N:M) with the least-squares "
            "weights on it (see docs/recipes.md)",
            {
                **RECIPE,
                "max_swaps": "auto",
                "refit_iters": 32,
                **_OBS,
                "range_threshold": 0.5,
                "backend": "auto",
            },
            shares_inverse=True,
            uses_inverse=lambda n, o: _selector_reads_inverse(o["select"], n),
            check=_check_recipe,
            layer_options=_recipe_layer_options,
            row_separable=lambda n, o: _composition_separable(o["select"], n, o),
            takes_rows=True,
        ),
    )
}
