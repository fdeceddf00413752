"""Exact power-of-two rescaling of a Hessian: the range `H` is used as given in, and the
scaling that brings one from outside it back without a rounding error."""

from __future__ import annotations

import math

import torch

# an `H` whose max diag(H) is 0 or in this range is factored (and solved) as given, else a
# copy scaled by a power of four (exactly: its inverse's factor then scales by a power of two)
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


def hessian_in_range(hmax: float) -> bool:
    """Whether an `H` with largest diagonal entry `hmax` is used as given (no rescaling)."""
    return hmax == 0 or H_RANGE[0] <= hmax <= H_RANGE[1]


__all__ = ["H_RANGE", "hessian_in_range", "hessian_scale_exponent", "scale_pow2"]
