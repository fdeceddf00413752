"""The one registry of pruning methods, `METHODS`, that `prune_model`, the CLI and
`compose_layer` read.

Each method's module declares its `Method` (its layer solver, the model-level options it takes
with their defaults, what the pipeline must give it, how the pipeline's arguments become a
solver call) and `register`s it. A method with a `Selection` is also a mask selector that a
composition (`compose_layer(select=name)`, `refine=`/`reconstruct=` in the pipeline) can start
from. This module imports no solver, so every solver module can import it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from ..ops import BackendUnavailableError, resolve_backend
from ..result import PruneResult

# Options the pipeline consumes itself for a method that needs gradients (GBLM's `G`):
# precomputed {name: G}, else computed with this norm and scale.
GRADIENT_OPTIONS = ("gradients", "norm", "scale")
# on CPU, experts of at most this many weights are solved as a batch: beyond it batched LAPACK
# and thin batched GEMMs lose to large single ones (benchmarks/bench_experts_batch.py;
# benchmarks/results/experts_batch_cpu.* has the measurements)
BATCH_MAX_ENTRIES = 1 << 21


@dataclass(frozen=True)
class Selection:
    """How a composition gets a mask selector's mask and weights.

    `run(W, H, sparsity, prune_n, prune_m, **context) -> PruneResult`: `context` holds `G`,
    `hinv`, `rows` and `compose_layer`'s options (blocksize, percdamp, backend,
    range_threshold, alpha); a hook takes what it reads and `**_`. Unless `takes_rows`, `W`
    and `G` are already the rows solved and `rows` is None. `row_separable(prune_n)`: whether
    the mask of any rows equals those rows of the whole layer's mask. `obs_weights`: the kept
    weights are already the OBS reconstruction on the mask (SparseGPT, ROSE), so
    `refine_on="reconstructed"` starts from them and `reconstruct=True` alone changes nothing.
    `reads_inverse`: the selection reads the shared inverse of H (`hinv`). `reconstruct`: the
    OBS reconstruction on a given mask (`run`'s arguments plus `mask=`) where it must differ
    from SparseGPT's natural-order one (ROSE's column order); it factors its own H.
    `takes_scaler`: `run` and `reconstruct` take `scaler=`, the running scaler of the layer's
    inputs in place of diag(H)/2 in the selection score (ROSE's `score_scaler="running"`).
    """

    run: Callable[..., PruneResult]
    row_separable: Callable[[int], bool]
    takes_rows: bool = False
    obs_weights: bool = False
    reads_inverse: bool = False
    reconstruct: Callable[..., PruneResult] | None = None
    takes_scaler: bool = False


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
    ranks (None: never; a selector's own defaults to its `select.row_separable`).
    `select`: the selection hook that makes the method a mask selector for compositions.
    `takes_quant`: the solver also rounds the kept weights to a grid (`quant=` a
    `fastprune.quant.QuantSpec`, its result's `quant` the quantized layer), so the pipeline's
    `quant` option applies to it.
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
    # the solver reads only diag(H): a pipeline may accumulate that alone
    reads_diagonal: bool = False
    # solves a batch of same-shaped layers at once (MoE experts): `batch_solver(W [E, r, c],
    # H [E, c, c], sparsity, prune_n, prune_m, **solver options, hinvs=)` -> [PruneResult]
    batch_solver: Callable[..., list[PruneResult]] | None = None
    select: Selection | None = None
    takes_quant: bool = False
    # prunes weights (False: quantizes only, e.g. GPTQ: sparsity must be 0, no pattern)
    prunes: bool = True
    # whether a solve with these options reads the ROSE repository's running scaler of the
    # layer's inputs (`fastprune.hessian.RunningScaler`): the pipeline then accumulates it
    # beside H per input and `solve` passes it as `scaler=` (None: never)
    reads_scaler: Callable[[Mapping[str, Any]], bool] | None = None
    # whether a solve with these options reads a held-out split of the calibration samples
    # (`damping_levels`): the pipeline then also accumulates the Hessian of a held-out slice
    # per input and `solve` passes `held_out=(H_fit, H_held)` (None: never)
    reads_held_out: Callable[[Mapping[str, Any]], bool] | None = None

    def wants_held_out(self, options: Mapping[str, Any]) -> bool:
        """Whether a solve with these options reads a held-out split (`reads_held_out`)."""
        return self.reads_held_out is not None and self.reads_held_out(options)

    def wants_scaler(self, options: Mapping[str, Any]) -> bool:
        """Whether a solve with these options reads the running scaler (`reads_scaler`)."""
        return self.reads_scaler is not None and self.reads_scaler(options)

    def separable(self, prune_n: int, options: Mapping[str, Any]) -> bool:
        """Whether this method's layers may be solved in row slices (see `row_separable`)."""
        return self.row_separable is not None and self.row_separable(prune_n, options)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if self.row_separable is None and self.select is not None:
            rule = self.select.row_separable
            object.__setattr__(self, "row_separable", lambda prune_n, opts: rule(prune_n))
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
        quant=None,
        scaler_row: torch.Tensor | None = None,
        held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> PruneResult:
        """One layer: `options` as returned by `check_options`; `hinv` the shared inverse
        (only for `shares_inverse` methods, None to let the solver compute it). `rows`: solve
        only these rows of `W` (and `G`), for a `separable` method; per-layer options (the
        swap budget) are still those of the whole layer. `quant`: the grid the kept weights
        are rounded to (a `takes_quant` method only; None: no rounding). `scaler_row`: the
        running scaler of the layer's inputs, where `wants_scaler(options)`. `held_out`:
        `(H_fit, H_held)`, the Hessians of the calibration samples outside and inside the
        held-out slice, where `wants_held_out(options)` (None: no held-out samples reached
        the layer; the solver then keeps its default damping)."""
        kw = {k: options[k] for k in self.solver_options}
        if quant is not None:
            if not self.takes_quant:
                raise ValueError(f"method {self.name!r} does not quantize (quant={quant!r})")
            kw["quant"] = quant
        if self.wants_scaler(options):
            if scaler_row is None:
                raise ValueError(
                    f"method {self.name!r} with these options reads the running scaler of the "
                    "layer's inputs: pass scaler_row"
                )
            kw["scaler"] = scaler_row
        if self.wants_held_out(options):
            kw["held_out"] = held_out
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
        solved as one batch here: the method has a batch solver (the ops' batched forms, on
        the backend dispatch picks, which falls back for a form a backend lacks) and, on CPU,
        the layers are small enough for the Python loop over columns to dominate
        (`BATCH_MAX_ENTRIES`)."""
        backend = options.get("backend", "auto")
        if self.batch_solver is None:
            return False
        if device.type == "cpu":  # a fast backend asked for on CPU: the single path runs it
            return _runs_torch(backend, device) and shape[0] * shape[1] <= BATCH_MAX_ENTRIES
        return True

    def solve_batch(self, W, H, sparsity, prune_n, prune_m, options, hinvs=None, quant=None):
        """Layers `W [E, rows, cols]` with Hessians `H` (`[E, cols, cols]` or E `[cols, cols]`
        tensors) and their inverses `hinvs`, solved together: one `PruneResult` per layer.
        `quant`: each layer's kept weights rounded to its own grids (`takes_quant` only)."""
        kw = {k: options[k] for k in self.solver_options}
        if quant is not None:
            if not self.takes_quant:
                raise ValueError(f"method {self.name!r} does not quantize (quant={quant!r})")
            kw["quant"] = quant
        return self.batch_solver(W, H, sparsity, prune_n, prune_m, **kw, hinvs=hinvs)


def _runs_torch(backend: str, device: torch.device) -> bool:
    """Whether `backend` resolves to the torch reference on `device` (False where it cannot
    run: the single-layer solver then says why)."""
    try:
        return resolve_backend(backend, device, ()) == "torch"
    except (BackendUnavailableError, ValueError):
        return False


def solver_defaults(solver: Callable, *names: str) -> dict[str, Any]:
    """`{name: default}` of these keywords of `solver`'s signature, so a method's options
    take their defaults from the one place they are declared."""
    params = inspect.signature(solver).parameters
    return {k: params[k].default for k in names}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to `METHODS` under its name (a `ValueError` if the name is taken); its
    module calls this once when imported, so `prune_model`, the CLI and, for a selector,
    `compose_layer` accept it. Returns `method`."""
    if not isinstance(method, Method):
        raise TypeError(f"register takes a Method, got {type(method).__name__}")
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove the method `name` from `METHODS` and return it (a `ValueError` if absent)."""
    return METHODS.pop(get_method(name).name)


def get_method(name) -> Method:
    """`METHODS[name]`, or a `ValueError` listing the methods."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {name!r}")
    return METHODS[name]


def methods_with(option: str) -> list[str]:
    """The methods that take `option` (for the CLI's flags and help)."""
    return [k for k, m in METHODS.items() if option in m.options]


def methods_where(capability: str) -> list[str]:
    """The methods whose `capability` (a `Method` field: "reads_diagonal", "select",
    "batch_solver", ...) is set, for messages and help that name them."""
    if capability not in Method.__dataclass_fields__:
        raise ValueError(f"{capability!r} is not a Method field")
    return [k for k, m in METHODS.items() if getattr(m, capability)]


def selectors() -> list[str]:
    """The mask selectors: the methods with a selection hook, that a composition starts from."""
    return methods_where("select")
