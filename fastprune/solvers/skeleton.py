"""The skeleton every layer solver runs in, so that each solver module holds only its algorithm.

`run_solver` (one layer) and `run_batch_solver` (same-shaped layers solved together, the
experts of one MoE projection) own what they share: the clock, the common argument checks
(W, H, sparsity, pattern, backend, in-place), the exact power-of-two rescaling of a layer
whose W or H lies outside the solve's range (the algorithm runs once, on the rescaled
copies; see `core.problem_scales`), the `Kernels` that run the ops and record what ran, the
result's base `info` and its finishing (loss and weights scaled back, dtype cast, in-place
write, achieved sparsity, seconds). `legacy_positional` keeps calls in an older argument
order working, with a `DeprecationWarning`.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..hessian import InverseHessian, scale_pow2
from ..masks import check_nm_keep_mask
from ..ops import Kernels
from ..quant import QuantizedWeight
from ..result import PruneResult
from ..validation import (
    check_backend,
    check_hessian,
    check_hessian_diagonal,
    check_inplace,
    check_mask,
    check_pattern,
    check_sparsity,
    check_weight,
    compute_dtype,
)
from .core import (
    LOSS_INFO_KEYS,
    base_info,
    finish,
    merge_kernel_info,
    problem_scales,
    scale_inverse,
)


@dataclass
class Problem:
    """A layer as an algorithm sees it: `W`, `H` as given, or exactly rescaled copies
    (`W / 2^ew`, `H / 2^eh`) when they lie outside the solve's range; the checked sparsity
    and pattern; the compute dtype; the `Kernels` (None for a solver without ops) and the
    result's `info` to fill. Inputs that scale with W or H go through `like_w`, `like_h`,
    `like_sqrt_h` or `inverse`, so they match the rescaled problem."""

    W: torch.Tensor
    H: torch.Tensor | None
    sparsity: float
    n: int
    m: int
    dtype: torch.dtype
    kernels: Kernels | None
    info: dict
    ew: int = 0
    eh: int = 0

    def _scaled(self, x: torch.Tensor | None, exponent: int) -> torch.Tensor | None:
        if x is None or exponent == 0:
            return x
        return scale_pow2(x.to(compute_dtype(x), copy=True), -exponent)

    def like_w(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """`x`, a tensor of weights (e.g. values kept in place of W), on W's scale."""
        return self._scaled(x, self.ew)

    def like_h(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """`x`, a quantity that scales as H (e.g. squared input norms), on H's scale."""
        return self._scaled(x, self.eh)

    def like_sqrt_h(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """`x`, a quantity that scales as sqrt(H) (e.g. GBLM's gradient norms); eh is even."""
        return self._scaled(x, self.eh // 2)

    def inverse(self, hinv: InverseHessian | None) -> InverseHessian | None:
        """`hinv`, an inverse of the given H, as the inverse of the rescaled H."""
        if hinv is None or self.eh == 0:
            return hinv
        return scale_inverse(hinv, self.eh, self.dtype)


@dataclass
class Outcome:
    """What an algorithm returns: the pruned weights and keep-mask of the problem's W (or of
    its `rows`, a slice, when only those were solved), the layer loss (None without H), and
    the quantized layer where the kept weights were rounded to a grid (`weight` is then its
    dequantized weight, on the problem's scale like everything else)."""

    weight: torch.Tensor
    keep: torch.Tensor
    loss: float | None
    rows: slice | None = None
    quant: QuantizedWeight | None = None


def unpruned(p: Problem, rows: slice | None = None) -> Outcome:
    """sparsity 0 (unstructured): every weight kept. The reference's `<=` rule would still
    prune one weight per block; 0 here means 'keep everything'."""
    W = p.W if rows is None else p.W[rows]
    p.info["note"] = "sparsity=0"
    keep = torch.ones(W.shape, dtype=torch.bool, device=W.device)
    return Outcome(W.clone(), keep, None if p.H is None else 0.0, rows)


def check_given_mask(
    mask: torch.Tensor | None, W: torch.Tensor, prune_n: int, prune_m: int
) -> None:
    """A keep-mask given to prune exactly (`mask=`): bool, W's shape and device, and of the
    N:M pattern given by prune_n/prune_m."""
    if mask is None:
        return
    check_mask(mask, W.shape, W.device)
    n, m = check_pattern(prune_n, prune_m, W.shape[1])
    if n and not check_nm_keep_mask(mask, n, m):
        raise ValueError(f"mask does not follow the {n}:{m} pattern given by prune_n/prune_m")


def _checked(W, H, sparsity, prune_n, prune_m, needs_h, diagonal_h, backend, inplace, check):
    """The common argument checks of one layer (and the method's own `check(W, H)`);
    returns `(W, H, sparsity, n, m)` normalised."""
    W = check_weight(W)
    check_inplace(inplace, W)
    if diagonal_h and isinstance(H, torch.Tensor) and H.dim() == 1:
        H = check_hessian_diagonal(H, W.shape[1], W.device)
    elif needs_h or H is not None:
        H = check_hessian(H, W.shape[1], W.device)
    s = check_sparsity(sparsity)
    n, m = check_pattern(prune_n, prune_m, W.shape[1])
    if backend is not None:
        check_backend(backend)
    if check is not None:
        check(W, H)
    return W, H, s, n, m


def _problem(method, W, H, s, n, m, dtype, kernels) -> Problem:
    """The layer as its algorithm sees it, rescaled exactly where W or H is out of range."""
    scales = problem_scales(W, H)
    ew, eh = scales or (0, 0)
    Ws = W if scales is None else scale_pow2(W.to(dtype, copy=True), -ew)
    Hs = H if scales is None or H is None else scale_pow2(H.to(dtype, copy=True), -eh)
    info = base_info(method, W, s, n, m, kernels.backend if kernels else "torch", dtype)
    return Problem(Ws, Hs, s, n, m, dtype, kernels, info, ew, eh)


def _finished(W: torch.Tensor, p: Problem, out: Outcome, t0: float, inplace: bool) -> PruneResult:
    """`out` of problem `p` as the `PruneResult` for the `W` given: what ran, then the
    weights, loss and losses in `info` scaled back (an overflow of W's dtype is an error)."""
    info = p.info
    if p.kernels is not None:
        merge_kernel_info(info, p.kernels.info())  # with what nested solves already added
    like = W if out.rows is None else W[out.rows]  # the weights the result stands for
    ew, eh = p.ew, p.eh
    if ew == 0 and eh == 0:  # solved as given (`problem_scales` never asks for 2^0, 2^0)
        return _with_quant(finish(like, out.weight, out.keep, out.loss, info, t0, inplace), out)
    weight = scale_pow2(out.weight.to(p.dtype), ew).to(W.dtype)
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"W: the pruned weight overflows {W.dtype} when scaled back (the updates grew "
            f"weights beyond its range; max|W| = {W.abs().amax().item():g})"
        )
    loss = None if out.loss is None else _unscale_loss(out.loss, ew, eh)
    for key in LOSS_INFO_KEYS:
        if info.get(key) is not None:
            info[key] = _unscale_loss(info[key], ew, eh)
    if "damp" in info:
        info["damp"] = math.ldexp(info["damp"], eh)
    info["rescaled"] = {"W": math.ldexp(1.0, ew), "H": math.ldexp(1.0, eh)}
    if out.quant is not None:  # the grid scales as W: the same codes, scales times 2^ew
        q = out.quant
        scale = scale_pow2(q.scale.to(torch.float64), ew).float()
        out.quant = QuantizedWeight(q.spec, q.codes, scale, q.zero, q.g_idx)
    return _with_quant(finish(like, weight, out.keep, loss, info, t0, inplace), out)


def _with_quant(r: PruneResult, out: Outcome) -> PruneResult:
    r.quant = out.quant
    return r


def run_solver(
    method: str,
    W: torch.Tensor,
    H: torch.Tensor | None,
    sparsity: float,
    prune_n: int,
    prune_m: int,
    algorithm: Callable[[Problem], Outcome],
    *,
    needs_h: bool = True,
    diagonal_h: bool = False,
    backend: str | None = None,
    ops: Sequence[str] = (),
    inplace: bool = False,
    check: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None,
) -> PruneResult:
    """Check the common arguments (and the method's own: `check(W, H)`), then run
    `algorithm` once on the layer, rescaled exactly by powers of two where W or H is outside
    the solve's range, and finish its `Outcome` into a `PruneResult` for the W given: weights
    scaled back (an overflow of W's dtype is an error), the loss and the losses in `info`
    by `s_w^2 s_h`, the damping by `s_h`. `backend`/`ops`: the `Kernels` the algorithm gets
    (none when `ops` is empty). `H` is checked when `needs_h` or given; with `diagonal_h`
    (a solver that reads only diag(H)) it may be that diagonal alone, `[cols]`."""
    t0 = time.perf_counter()
    W, H, s, n, m = _checked(
        W, H, sparsity, prune_n, prune_m, needs_h, diagonal_h, backend, inplace, check
    )
    kernels = Kernels(backend or "torch", W.device, tuple(ops)) if ops else None
    p = _problem(method, W, H, s, n, m, compute_dtype(W, H), kernels)
    return _finished(W, p, algorithm(p), t0, inplace)


def run_batch_solver(
    method: str,
    W: torch.Tensor,
    H: Sequence[torch.Tensor],
    sparsity: float,
    prune_n: int,
    prune_m: int,
    algorithm: Callable[[list[Problem]], list[Outcome]],
    *,
    backend: str | None = None,
    ops: Sequence[str] = (),
    check: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None,
) -> list[PruneResult]:
    """`run_solver` for a batch of same-shaped layers `W [E, rows, cols]`, each with its own
    `H[e]`: every layer checked and rescaled as `run_solver` does, one `Kernels` for all (the
    algorithm calls the ops' batched forms), `algorithm` run once on the list of the layers'
    `Problem`s (one compute dtype for all), and each `Outcome` finished into that layer's
    result. Each result's `seconds` is its share of the batch's time."""
    t0 = time.perf_counter()
    if not isinstance(W, torch.Tensor) or W.dim() != 3 or len(H) != W.shape[0]:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(
            f"W must be [E, rows, cols] and H E [cols, cols] Hessians, got {shape} and {len(H)}"
        )
    checked = [
        _checked(W[e], H[e], sparsity, prune_n, prune_m, True, False, backend, False, check)
        for e in range(W.shape[0])
    ]
    dtype = compute_dtype(W, *(h for _, h, *_ in checked))
    kernels = Kernels(backend or "torch", W.device, tuple(ops)) if ops else None
    problems = [_problem(method, *c, dtype, kernels) for c in checked]
    outcomes = algorithm(problems) if problems else []
    share = (time.perf_counter() - t0) / max(1, len(problems))
    results = []
    for (We, *_), p, out in zip(checked, problems, outcomes):
        r = _finished(We, p, out, time.perf_counter(), False)
        r.info["seconds"] = share
        results.append(r)
    return results


def _unscale_loss(loss: float, ew: int, eh: int) -> float:
    try:
        out = math.ldexp(loss, 2 * ew + eh)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ValueError(
            f"the layer loss (~{loss:g} x 2^{2 * ew + eh}) overflows float64: W and H are "
            "too large to report it"
        )
    return out


def legacy_positional(
    old_order: Sequence[str], is_legacy: Callable[[tuple], bool], new_call: str
) -> Callable:
    """Accept calls in a solver's former positional order: when `is_legacy(args)` holds the
    positional arguments are taken by the names of `old_order`, with a `DeprecationWarning`
    that shows the call to write instead (`new_call`)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def solver(*args, **kwargs):
            if is_legacy(args):
                if len(args) > len(old_order):
                    raise TypeError(
                        f"{fn.__name__}() takes at most {len(old_order)} positional arguments "
                        f"in its former order ({', '.join(old_order)}), got {len(args)}"
                    )
                named = dict(zip(old_order, args))
                clash = sorted(set(named) & set(kwargs))
                if clash:
                    raise TypeError(f"{fn.__name__}() got multiple values for {clash[0]!r}")
                warnings.warn(
                    f"{fn.__name__}({', '.join(old_order[: len(args)])}) is the former "
                    f"argument order; call {new_call}",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return fn(**named, **kwargs)
            return fn(*args, **kwargs)

        return solver

    return wrap


def beyond_lead(args: tuple) -> bool:
    """A call passing more than the common leading `(W, H, sparsity, prune_n, prune_m)`
    positionally."""
    return len(args) > 5


def tensor_or_none_at(index: int) -> Callable[[tuple], bool]:
    """A call whose positional argument `index` is a tensor or None, where the common order
    has a number (a former order put a tensor there)."""
    return lambda args: len(args) > index and (args[index] is None or torch.is_tensor(args[index]))
