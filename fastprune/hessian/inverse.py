"""The inverse a SparseGPT sweep consumes, from a calibration `H`: dead columns fixed,
damping retried until it factors, exact rescaling of an `H` out of range; and the check
that a given inverse belongs to the `H` it is used with."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from ..validation import check_hessian, check_percdamp, check_solve_dtype, compute_dtype
from .factor import INVERSE_METHODS, upper_factor
from .scaling import hessian_in_range, hessian_scale_exponent, scale_pow2

DEFAULT_PERCDAMP = 0.01
"""The damping fraction of mean(diag(H)) the reference adds (`percdamp`)."""


@dataclass
class InverseHessian:
    """Upper Cholesky factor of the damped `H^-1`, as the SparseGPT sweep consumes it.

    Depends only on `H` (not on W), so layers that share an input share one of these.
    """

    hinv: torch.Tensor  # upper triangular [cols, cols]
    dead: torch.Tensor  # bool [cols]: columns with diag(H) == 0
    damp: float  # absolute damping added to the diagonal
    percdamp: float  # the fraction of mean(diag(H)) that was finally used
    retries: int = 0
    info: dict = field(default_factory=dict)
    # the H it was computed from, as (a weak reference to that tensor, its version counter
    # then): an inverse handed back with the very same, unmodified H needs no probe
    source: tuple | None = field(default=None, repr=False, compare=False)

    def computed_from(self, H: torch.Tensor) -> bool:
        """Whether this inverse was computed from the tensor `H`, unmodified since."""
        return self.source is not None and self.source[0]() is H and self.source[1] == H._version

    def as_info(self) -> dict:
        return {
            "damp": self.damp,
            "percdamp_used": self.percdamp,
            "damp_retries": self.retries,
            "dead_columns": int(self.dead.sum().item()),
        }


def _damp_schedule(percdamp: float, tries: int) -> list[float]:
    """The requested damping first, then growing by 10x (from at least 1e-4 of mean(diag))."""
    out = [percdamp]
    base = max(percdamp, 1e-4)
    for k in range(1, tries):
        out.append(base * 10**k)
    return out


@torch.no_grad()
def inverse_hessian(
    H: torch.Tensor,
    percdamp: float = DEFAULT_PERCDAMP,
    *,
    dtype: torch.dtype | None = None,
    max_tries: int = 8,
    method: str = "direct",
) -> InverseHessian:
    """Damp `H`, fix dead columns and return the upper Cholesky factor `U` of `H^-1`
    (`H^-1 = U^T U`, `U` upper triangular with positive diagonal).

    Same steps as the reference (`H[dead, dead] = 1`; `H += percdamp * mean(diag(H)) * I`),
    then `method`: "direct" (default) factors the flipped `H` once and inverts the triangular
    factor (`U = (J chol(J H J) J)^-1`, ~2/3 n^3 flops); "reference" is SparseGPT's
    cholesky -> cholesky_inverse -> upper cholesky (~4/3 n^3 flops), kept for the drop-in
    replacements in `fastprune.compat`. Both give the same `U` up to rounding. A
    factorisation that fails (or gives non-finite values) is retried with 10x more damping
    each time and reported instead of raising. An `H` whose largest diagonal entry is
    outside `H_RANGE` is factored as `H / 4^k` and `U` scaled back by `2^-k` (exact).
    `H` is not modified.
    """
    if not isinstance(H, torch.Tensor) or H.dim() != 2:
        raise TypeError("H must be a 2-D torch.Tensor")
    if method not in INVERSE_METHODS:
        raise ValueError(f"method must be one of {INVERSE_METHODS}, got {method!r}")
    check_hessian(H, H.shape[0], H.device)
    percdamp = check_percdamp(percdamp)
    if dtype is not None:
        check_solve_dtype(dtype)
    dtype = dtype or compute_dtype(H)
    hmax = torch.diagonal(H).amax().item()
    eh = 0 if hessian_in_range(hmax) else hessian_scale_exponent(hmax)
    if eh:  # scaled exactly in H's precision first, so a float64 H fits a float32 solve
        wide = torch.float64 if H.dtype == torch.float64 else dtype
        Hd = scale_pow2(H.to(wide, copy=True), -eh).to(dtype)
        dead = torch.diagonal(H) == 0  # not the entries the scaling flushed to zero
    else:
        Hd = H.to(dtype, copy=True)
        dead = torch.diagonal(Hd) == 0
    diag = torch.diagonal(Hd)
    diag[dead] = 1
    mean_diag = diag.mean().item()
    if mean_diag <= 0:
        raise ValueError("H has a non-positive mean diagonal: it is not a Gram matrix")
    for tries, p in enumerate(_damp_schedule(percdamp, max_tries)):
        damp = p * mean_diag
        U = upper_factor(Hd, damp, method)
        if U is None or not torch.isfinite(U).all():
            continue
        if eh:  # H = 2^eh H' => H^-1 = 2^-eh U'^T U' => U = 2^(-eh/2) U'
            U = scale_pow2(U, -eh // 2)
            if not torch.isfinite(U).all() or not (U.diagonal() > 0).all():
                raise ValueError(
                    f"H (max diag {hmax:g}) is positive semi-definite but the factor of its "
                    f"inverse is not representable in {dtype}: pass H in float64"
                )
        return InverseHessian(
            hinv=U,
            dead=dead,
            damp=math.ldexp(damp, eh),
            percdamp=p,
            retries=tries,
            source=(weakref.ref(H), H._version),
        )
    raise ValueError(
        f"H could not be factored even with damping {p:g} x mean(diag(H)): it is not "
        "positive semi-definite (check how it was accumulated)"
    )


# `check_inverse_of`: the largest relative error of the probes' energy that still counts as
# the inverse of H: far above an inverse of its own H's (well- to ill-conditioned,
# rank-deficient, percdamp down to 0) and far below the inverse of H/2's, 2H's or another H's;
# tests/test_sparsegpt.py checks both sides
INVERSE_PROBE_RTOL = 0.05


@torch.no_grad()
def check_inverse_of(inv: InverseHessian, H: torch.Tensor, name: str = "hinv", probes: int = 4):
    """Refuse an inverse that was not computed from `H` (another layer's, or a rescaled H's):
    for a few fixed random vectors `v` on H's live columns, `y = U^T v` must satisfy
    `y^T (H + damp I) y = v^T v` (as `U (H + damp I) U^T = I`). O(cols^2) work; robust to
    ill-conditioning (an energy, not a solve). `ValueError` naming `name` otherwise. An
    inverse `inverse_hessian` computed from this very tensor, unmodified since, passes
    without a probe (no host sync on the pipeline's shared inverses)."""
    if inv.computed_from(H):
        return
    U = inv.hinv
    if U.shape != H.shape:
        raise ValueError(f"{name} is {tuple(U.shape)}, H is {tuple(H.shape)}")
    g = torch.Generator().manual_seed(0)
    V = torch.randn(U.shape[0], probes, generator=g, dtype=torch.float64)
    V = V.to(U.device, U.dtype).masked_fill_(inv.dead.reshape(-1, 1), 0)
    Y = U.t() @ V
    HY = (H.to(U.dtype) @ Y).add_(Y, alpha=inv.damp).masked_fill_(inv.dead.reshape(-1, 1), 0)
    vv = (V * V).sum(0, dtype=torch.float64)
    err = (((Y * HY).sum(0, dtype=torch.float64) - vv).abs() / vv).max().item()
    if not err <= INVERSE_PROBE_RTOL:
        raise ValueError(
            f"{name} is not the inverse of this H (a probe's energy is off by {err:.3g} "
            f"relative, above {INVERSE_PROBE_RTOL}): pass inverse_hessian(H, percdamp) of the "
            "same H, or no inverse"
        )


__all__ = [
    "DEFAULT_PERCDAMP",
    "INVERSE_PROBE_RTOL",
    "InverseHessian",
    "check_inverse_of",
    "inverse_hessian",
]
