"""Calibration Hessians: streaming accumulation, damping, dead columns, robust inverse.

`H = 2/n * sum_t x_t x_t^T` accumulated in float32, where `n` counts samples (sequences), not
tokens. `diag(H)/2` is Wanda's per-input-channel `||x_j||^2` scaler.

Two arithmetics (`HESSIAN_PRECISIONS`):
- "exact": the SparseGPT reference's, step for step: `H *= n/(n+b)`, inputs upcast to float32
  and scaled by `sqrt(2/(n+b))`, then `H += x x^T` in float32 (SGEMM).
- "fast": for float16/bfloat16 activations on a GPU, `x x^T` on the tensor cores from the
  half-precision inputs with float32 accumulation (a product of two half values is exact in
  float32), then `H = n/(n+b) H + 2/(n+b) (x x^T)`. It differs from "exact" only by float32
  rounding (where the `2/n` scale is applied and the summation order): ~1e-7 relative per
  entry; tests/test_hessian.py measures it against a float64 truth.
"auto" takes "fast" where it applies (half-precision inputs on CUDA) and "exact" elsewhere:
float32 models always get the reference's arithmetic.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from .validation import (
    all_finite,
    check_finite,
    check_hessian,
    check_int,
    check_percdamp,
    check_real_data,
    check_solve_dtype,
    non_finite_error,
)

HESSIAN_PRECISIONS = ("auto", "exact", "fast")
# what a pipeline accumulates per input: the full `H`, or only its diagonal (all that Wanda
# and GBLM read; "auto" picks it for them)
HESSIAN_KINDS = ("auto", "full", "diagonal")
_HALF = (torch.float16, torch.bfloat16)
# `inverse_hessian` factors H as given when max diag(H) is 0 or in this range, else a copy
# scaled by a power of four (exactly: the factor then scales by a power of two)
H_RANGE = (2.0**-48, 2.0**48)


def scale_pow2(T: torch.Tensor, e: int) -> torch.Tensor:
    """`T *= 2^e` in place, exactly (barring over/underflow of the results themselves): in
    steps small enough that each factor is representable in T's dtype."""
    step = math.frexp(torch.finfo(T.dtype).max)[1] - 2
    while e:
        k = max(-step, min(step, e))
        T.mul_(math.ldexp(1.0, k))
        e -= k
    return T


def hessian_scale_exponent(hmax: float) -> int:
    """The even `eh` with `hmax / 2^eh` in [1, 4) (0 for hmax == 0)."""
    return 2 * ((math.frexp(hmax)[1] - 1) // 2) if hmax > 0 else 0


def _half_gram(x: torch.Tensor) -> torch.Tensor:
    """`x x^T` in float32 from half-precision `x [cols, tokens]`: tensor cores with float32
    accumulation where torch offers it (`mm(..., out_dtype=)`, CUDA), else upcast first
    (the same products, each exact in float32)."""
    if x.is_cuda:
        try:
            return torch.mm(x, x.t(), out_dtype=torch.float32)
        except (TypeError, NotImplementedError, RuntimeError):
            pass
    xf = x.float()
    return xf @ xf.t()


def uses_fast_hessian(precision: str, x: torch.Tensor) -> bool:
    """Whether `precision` ("auto" | "exact" | "fast") takes the fast arithmetic for inputs
    like `x`: "fast" for half-precision inputs, "auto" for half-precision inputs on CUDA."""
    if precision not in HESSIAN_PRECISIONS:
        raise ValueError(f"precision must be one of {HESSIAN_PRECISIONS}, got {precision!r}")
    if precision == "exact" or x.dtype not in _HALF:
        return False
    return precision == "fast" or x.is_cuda


def _check_update_range(
    H: torch.Tensor, nsamples: int, x: torch.Tensor, total: int, fast: bool, name: str
) -> bool:
    """Refuse (before `H` is touched) an update whose `H` would overflow H's dtype; returns
    whether the fast arithmetic may run (its raw `x x^T`, before the `2/n`, must fit too).
    Ordinary inputs pass on one host sync (max|x| and max diag(H) read together; a NaN/inf in
    `x` shows in max|x| and is refused here too); only near the limit are the exact per-column
    sums of squares taken (float64). PSD: every entry is bounded by the largest diagonal."""
    lim = torch.finfo(H.dtype).max / 4
    peaks = [torch.linalg.vector_norm(x, float("inf")), torch.diagonal(H).amax()]
    xmax, hmax = torch.stack([p.double() for p in peaks]).tolist()
    if not math.isfinite(xmax):
        raise non_finite_error(x, name)
    raw = xmax * xmax * x.shape[1]
    if hmax * (nsamples / total) + raw * (2 / total) <= lim and (not fast or raw <= lim):
        return fast
    d = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square()
    raw = d.max().item()
    new = (torch.diagonal(H).double() * (nsamples / total) + d * (2 / total)).max().item()
    if not new <= lim:
        hint = (
            "accumulate in float64 (HessianAccumulator(..., dtype=torch.float64)) or scale "
            "the activations down"
            if H.dtype != torch.float64
            else "scale the activations down"
        )
        raise ValueError(
            f"{name}: the {str(H.dtype).replace('torch.', '')} Hessian would overflow "
            f"(max diag(H) ~{new:.3g}, above {lim:.3g}; |{name}| up to {xmax:.3g}); {hint}"
        )
    return fast and raw <= lim


def running_hessian_update(
    H: torch.Tensor,
    nsamples: int,
    x: torch.Tensor,
    b: int,
    precision: str = "exact",
    name: str = "inp",
) -> int:
    """Running update of `H = 2/n sum x x^T` in place, for `b` new samples whose inputs are
    the columns of `x [cols, tokens]`; returns the new sample count. `precision`: see the
    module docstring ("exact", the default, is the reference's arithmetic). An update whose
    `H` would overflow is refused with a ValueError naming `name`, `H` untouched."""
    total = nsamples + b
    fast = H.dtype == torch.float32 and uses_fast_hessian(precision, x)
    if _check_update_range(H, nsamples, x, total, fast, name):
        H.mul_(nsamples / total).add_(_half_gram(x), alpha=2 / total)
        return total
    H *= nsamples / total
    x = math.sqrt(2 / total) * x.to(H.dtype)
    H += x @ x.t()
    return total


def _check_batch(inp: object, cols: int) -> torch.Tensor:
    """A batch of layer inputs as `[batch, tokens, cols]` (a 2-D input is one sample)."""
    if not isinstance(inp, torch.Tensor):
        raise TypeError(f"inp must be a torch.Tensor, got {type(inp).__name__}")
    if not inp.is_floating_point():
        raise TypeError(f"inp must be a real floating-point tensor, got dtype {inp.dtype}")
    if inp.dim() == 2:
        inp = inp.unsqueeze(0)
    if inp.dim() != 3 or inp.shape[-1] != cols:
        raise ValueError(
            f"inp must be [batch, tokens, {cols}] or [tokens, {cols}], got {tuple(inp.shape)}"
        )
    check_real_data(inp, "inp")
    return inp


class HessianAccumulator:
    """Streams activations `[batch, tokens, cols]` or `[tokens, cols]` into `H`.

    Mirrors the reference's `add_batch`: a 2-D input counts as one sample; a 3-D input counts
    `batch` samples; a batch without tokens adds and counts nothing. Accumulates in float32
    whatever the input dtype; `precision` picks the arithmetic ("auto": tensor cores for
    half-precision inputs on a GPU, else the reference's; see the module docstring).
    """

    def __init__(
        self,
        cols: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        precision: str = "auto",
    ) -> None:
        cols = check_int(cols, "cols", minimum=1)
        check_solve_dtype(dtype)
        if precision not in HESSIAN_PRECISIONS:
            raise ValueError(f"precision must be one of {HESSIAN_PRECISIONS}, got {precision!r}")
        self.cols = int(cols)
        self.H = torch.zeros(cols, cols, device=device, dtype=dtype)
        self.nsamples = 0
        self.precision = precision

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """Add a batch of layer inputs (the reference's `add_batch(inp, out)` without `out`)."""
        inp = _check_batch(inp, self.cols)
        if inp.shape[0] * inp.shape[1] == 0:  # no tokens (an expert no token was routed to)
            return
        # NaN/inf are refused by the update's range check, before H is touched
        x = inp.reshape(-1, self.cols).to(device=self.H.device)
        self.nsamples = running_hessian_update(
            self.H, self.nsamples, x.t(), inp.shape[0], self.precision
        )

    @property
    def scaler_row(self) -> torch.Tensor:
        """Wanda's `||x_j||^2 / n` per input channel, i.e. `diag(H)/2`."""
        return torch.diagonal(self.H) / 2


def scaler_update(scaler: torch.Tensor, nsamples: int, sq: torch.Tensor, b: int) -> int:
    """Wanda's running mean of each input channel's squared norm, in place and in Wanda's
    arithmetic: `scaler *= n/(n+b)`, then `scaler += sq/(n+b)` for `b` new samples whose
    squared norms per channel are `sq`; returns `n+b`."""
    total = nsamples + b
    scaler *= nsamples / total
    scaler += sq / total
    return total


def hessian_diagonal(H: torch.Tensor) -> torch.Tensor:
    """`diag(H)` of a full `H [cols, cols]`, or `H` itself when only its diagonal `[cols]` is
    kept (`DiagonalAccumulator`)."""
    return H if H.dim() == 1 else torch.diagonal(H)


class DiagonalAccumulator:
    """Streams activations (as `HessianAccumulator`) into `diag(H)` alone: `cols` floats
    instead of `cols^2`, and no GEMM. It keeps Wanda's own statistic, `scaler_row` (the
    running mean over samples of `||x_j||^2`, in Wanda's arithmetic, so a pipeline's Wanda
    matches the original code bit for bit), and `H = 2 * scaler_row` (exact: a power of
    two). For the methods that read only the diagonal (Wanda, GBLM); no layer loss
    `tr(D H D^T)` can be computed from it."""

    def __init__(self, cols: int, device: torch.device | str | None = None) -> None:
        self.cols = check_int(cols, "cols", minimum=1)
        self.scaler_row: torch.Tensor | None = torch.zeros(cols, device=device)
        self.nsamples = 0

    @property
    def H(self) -> torch.Tensor | None:
        return None if self.scaler_row is None else 2 * self.scaler_row

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        self.scaler_row = None if value is None else value / 2

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """Add a batch of layer inputs `[batch, tokens, cols]` (batch samples) or
        `[tokens, cols]` (one sample); a batch without tokens adds and counts nothing."""
        inp = _check_batch(inp, self.cols)
        if inp.shape[0] * inp.shape[1] == 0:
            return
        x = inp.reshape(-1, self.cols).t().to(device=self.scaler_row.device).float()
        sq = torch.norm(x, p=2, dim=1) ** 2
        if not all_finite(sq):  # NaN/inf inputs, or squares beyond float32
            check_finite(x, "inp")
            raise ValueError(
                "inp: the squared input norms overflow float32 (diag(H)); scale the "
                "activations down"
            )
        self.nsamples = scaler_update(self.scaler_row, self.nsamples, sq, inp.shape[0])


def accumulate_hessian(batches, cols: int | None = None, device=None) -> torch.Tensor:
    """Convenience: accumulate an iterable of activation batches into one float32 `H`."""
    acc = None
    for x in batches:
        if acc is None:
            acc = HessianAccumulator(cols or x.shape[-1], device=device or x.device)
        acc.add_batch(x)
    if acc is None:
        raise ValueError("batches is empty: need at least one calibration batch")
    return acc.H


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


INVERSE_METHODS = ("direct", "reference")


def upper_triangular_inverse(R: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """`R^-1` of an upper triangular `R` (itself upper triangular), by halves:
    `[[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]`, the corner by two triangular
    solves (`A^-1 B`, then `(.) C^-1`) and the diagonal blocks recursively; blocks of at most
    `leaf` columns are solved against the identity. ~n^3/3 flops, as LAPACK's trtri. `R` may
    carry leading batch dimensions (`[..., n, n]`: every matrix inverted alike)."""
    n = R.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=R.dtype, device=R.device).expand_as(R)
        return torch.linalg.solve_triangular(R, eye, upper=True)
    h = n // 2
    out = torch.zeros_like(R)
    A, B, C = R[..., :h, :h], R[..., :h, h:], R[..., h:, h:]
    X = torch.linalg.solve_triangular(A, B, upper=True)  # A^-1 B
    out[..., :h, h:] = torch.linalg.solve_triangular(C, X, upper=True, left=False).neg_()
    del X
    out[..., :h, :h] = upper_triangular_inverse(A, leaf)
    out[..., h:, h:] = upper_triangular_inverse(C, leaf)
    return out


def _upper_factor_direct(Hd: torch.Tensor, damp: float) -> torch.Tensor | None:
    """`U = R^-1` with `R = J L' J`, `L'` the lower Cholesky factor of `J A J` (`J` the
    flip, `A = Hd + damp I`): `A = R R^T` with `R` upper, so `A^-1 = R^-T R^-1 = U^T U`.
    One Cholesky and one triangular inverse (~2/3 n^3 flops). None if `A` does not factor."""
    A = torch.flip(Hd, (0, 1))  # a copy; the flip keeps the diagonal on the diagonal
    A.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if info.item() != 0:
        return None
    R = torch.flip(L, (0, 1))
    del L
    return upper_triangular_inverse(R)


def _upper_factor_reference(Hd: torch.Tensor, damp: float) -> torch.Tensor | None:
    """The SparseGPT reference's `U = chol_upper(cholesky_inverse(chol(A)))`, `A = Hd + damp I`
    (~4/3 n^3 flops: two Cholesky factorisations and an inverse from one). None on failure."""
    A = Hd.clone()
    idx = torch.arange(A.shape[0], device=A.device)
    A[idx, idx] += damp
    L, info = torch.linalg.cholesky_ex(A)
    if info.item() != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return None if info.item() != 0 else U


@torch.no_grad()
def inverse_hessian(
    H: torch.Tensor,
    percdamp: float = 0.01,
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
    dtype = dtype or (torch.float64 if H.dtype == torch.float64 else torch.float32)
    hmax = torch.diagonal(H).amax().item()
    eh = 0 if hmax == 0 or H_RANGE[0] <= hmax <= H_RANGE[1] else hessian_scale_exponent(hmax)
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
    factor = _upper_factor_direct if method == "direct" else _upper_factor_reference
    for tries, p in enumerate(_damp_schedule(percdamp, max_tries)):
        damp = p * mean_diag
        U = factor(Hd, damp)
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
# the inverse of H (measured: <= 1.3e-3 for inverses of their own H, well- to ill-conditioned,
# rank-deficient, percdamp down to 0; >= 0.1 for the inverse of H/2 or 2H, >= 19 for another H)
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


def _loss_terms(W: torch.Tensor, Wp: torch.Tensor, H: torch.Tensor):
    """`(D H) * D` for `D = W - W_p`, a chunk of rows at a time (float32, float64 for float64
    inputs), so a big layer does not need a second rows x cols temporary at once."""
    dtype = torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32
    D = W.to(dtype) - Wp.to(dtype)
    Hc = H.to(dtype)
    step = max(1, (1 << 24) // max(1, W.shape[1]))
    for r0 in range(0, D.shape[0], step):
        Dr = D[r0 : r0 + step]
        yield (Dr @ Hc) * Dr


def layer_loss(W: torch.Tensor, Wp: torch.Tensor, H: torch.Tensor) -> float:
    """`tr((W - W_p) H (W - W_p)^T)`, computed in float32 (float64 for float64 inputs)."""
    total = 0.0
    for t in _loss_terms(W, Wp, H):
        total += t.sum(dtype=torch.float64).item()
    return float(total)


def row_losses(W: torch.Tensor, Wp: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Each row's `d H d^T` (`d = w - w_p`) as float64: the terms of `layer_loss`."""
    return torch.cat([t.sum(1, dtype=torch.float64) for t in _loss_terms(W, Wp, H)])


__all__ = [
    "INVERSE_METHODS",
    "DiagonalAccumulator",
    "HessianAccumulator",
    "InverseHessian",
    "accumulate_hessian",
    "check_inverse_of",
    "inverse_hessian",
    "layer_loss",
    "check_finite",
    "upper_triangular_inverse",
]
