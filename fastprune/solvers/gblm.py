"""GBLM-Pruner: Wanda's score plus `alpha * |W| * G`, `G` the calibration gradients' norm
per weight (accumulated by `GradientNormAccumulator`); selection as Wanda."""

from __future__ import annotations

import math
import numbers

import torch

from ..result import PruneResult
from ..validation import check_device, check_finite, compute_dtype
from .core import wanda_score
from .registry import GRADIENT_OPTIONS, Method, Selection, register, solver_defaults
from .selection import by_score
from .skeleton import Problem, legacy_positional, run_solver, tensor_or_none_at

NORMS = ("l1", "l2")  # how the per-sample gradients are accumulated into G


def gblm_score(W: torch.Tensor, H: torch.Tensor, G: torch.Tensor, alpha: float) -> torch.Tensor:
    """GBLM-Pruner: `|W| * sqrt(diag(H)/2) + alpha * |W| * G`."""
    dtype = compute_dtype(W, H, G)
    return wanda_score(W, H).to(dtype) + alpha * W.to(dtype).abs() * G.to(dtype)


@legacy_positional(
    ("W", "H", "G", "sparsity", "prune_n", "prune_m", "alpha"),
    tensor_or_none_at(2),
    "gblm_layer(W, H, sparsity, prune_n, prune_m, G=G, alpha=...)",
)
@torch.no_grad()
def gblm_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    *,
    G: torch.Tensor,
    alpha: float = 1.0,
    inplace: bool = False,
) -> PruneResult:
    """GBLM-Pruner: score `|W| * sqrt(diag(H)/2) + alpha * |W| * G` with `G` the accumulated
    gradient norm per weight (see `fastprune.gradient_norm`); selection as Wanda. `H` may
    be its diagonal alone, `[cols]`."""

    def check_g(W: torch.Tensor, H: torch.Tensor | None) -> None:
        if not isinstance(G, torch.Tensor):
            raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
        if G.shape != W.shape:
            raise ValueError(f"G has shape {tuple(G.shape)} but W has {tuple(W.shape)}")
        if not G.is_floating_point():
            raise TypeError(f"G must be a floating-point tensor, got dtype {G.dtype}")
        check_device(G, W.device, "G")
        check_finite(G, "G")
        if (G < 0).any():
            raise ValueError("G must be a non-negative gradient norm")
        number = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
        if not (number and math.isfinite(alpha)):
            raise TypeError(f"alpha must be a finite number, got {alpha!r}")

    def score(p: Problem):
        p.info["alpha"] = float(alpha)
        # G scales as sqrt(H), so on a rescaled layer the score's two terms keep their ratio
        g = p.like_sqrt_h(G)
        return lambda r: gblm_score(p.W[r], p.H, g[r], float(alpha))

    return run_solver(
        "gblm", W, H, sparsity, prune_n, prune_m, by_score(score, per_row=True),
        diagonal_h=True, inplace=inplace, check=check_g,
    )  # fmt: skip


class GradientNormAccumulator:
    """Accumulates GBLM's per-weight gradient norm over calibration samples without keeping
    every gradient: l2 `sqrt(sum_s (scale*g_s)^2)` or l1 `sum_s |scale*g_s|` (scale 100)."""

    def __init__(self, shape, device=None, norm: str = "l2", scale: float = 100.0) -> None:
        _check_norm(norm)
        self.norm, self.scale = norm, float(scale)
        self.acc = torch.zeros(shape, dtype=torch.float32, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, grad: torch.Tensor) -> None:
        g = grad.to(self.acc.device, torch.float32) * self.scale
        if self.norm == "l2":
            self.acc += g * g
        else:
            self.acc += g.abs()
        self.nsamples += 1

    @property
    def G(self) -> torch.Tensor:
        return self.acc.sqrt() if self.norm == "l2" else self.acc.clone()


def gradient_norm(grads, norm: str = "l2", scale: float = 100.0) -> torch.Tensor:
    """G from an iterable of per-sample gradients (convenience for the layer API)."""
    acc = None
    for g in grads:
        if acc is None:
            acc = GradientNormAccumulator(g.shape, g.device, norm, scale)
        acc.add(g)
    if acc is None:
        raise ValueError("grads is empty: need at least one per-sample gradient")
    return acc.G


def _check_norm(norm: object) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")


def _check_options(opts: dict) -> dict:
    _check_norm(opts["norm"])
    return opts


def _select(W, H, sparsity, prune_n, prune_m, *, G, alpha, **_) -> PruneResult:
    """A composition's mask: GBLM's (the selection hook)."""
    return gblm_layer(W, H, sparsity=sparsity, prune_n=prune_n, prune_m=prune_m, G=G, alpha=alpha)


register(
    Method(
        "gblm",
        gblm_layer,
        "Wanda's score + alpha * |W| * gradient norm (GBLM-Pruner)",
        {
            **solver_defaults(gblm_layer, "alpha"),
            **solver_defaults(gradient_norm, "norm", "scale"),
            "gradients": None,
        },
        needs_gradients=True,
        pipeline_options=GRADIENT_OPTIONS,
        check=_check_options,
        reads_diagonal=True,
        select=Selection(_select, row_separable=lambda prune_n: True),  # per output row
    )
)
