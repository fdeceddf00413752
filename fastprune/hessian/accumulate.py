"""Calibration Hessians accumulated from streamed activations: the running `2/n sum x x^T`
update in the reference's arithmetic or the tensor-core one, refused before it overflows.

`H = 2/n * sum_t x_t x_t^T` accumulated in float32, where `n` counts samples (sequences), not
tokens. `diag(H)/2` is Wanda's per-input-channel `||x_j||^2` scaler.

Two arithmetics (`HESSIAN_PRECISIONS`):
- "exact": the SparseGPT reference's, step for step: `H *= n/(n+b)`, inputs upcast to float32
  and scaled by `sqrt(2/(n+b))`, then `H += x x^T` in float32 (SGEMM).
- "fast": for float16/bfloat16 activations on a GPU, `x x^T` on the tensor cores from the
  half-precision inputs with float32 accumulation (a product of two half values is exact in
  float32), then `H = n/(n+b) H + 2/(n+b) (x x^T)`. It differs from "exact" only by float32
  rounding (where the `2/n` scale is applied and the summation order); tests/test_hessian.py
  checks it against a float64 truth.
"auto" takes "fast" where it applies (half-precision inputs on CUDA) and "exact" elsewhere:
float32 models always get the reference's arithmetic.
"""

from __future__ import annotations

import math

import torch

from ..validation import check_int, check_real_data, check_solve_dtype, non_finite_error

HESSIAN_PRECISIONS = ("auto", "exact", "fast")
# what a pipeline accumulates per input: the full `H`, or only its diagonal (all that Wanda
# and GBLM read; "auto" picks it for them)
HESSIAN_KINDS = ("auto", "full", "diagonal")
_HALF = (torch.float16, torch.bfloat16)


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


__all__ = [
    "HESSIAN_KINDS",
    "HESSIAN_PRECISIONS",
    "HessianAccumulator",
    "accumulate_hessian",
    "running_hessian_update",
    "uses_fast_hessian",
]
