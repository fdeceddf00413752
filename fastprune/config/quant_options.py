"""The quantization options of a prune (`quant`, `bits`, `group_size`, `sym`, `actorder`):
their checks, and the grid (`fastprune.quant.QuantSpec`) they make together."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from .declare import Name, given

QUANT_PRESETS = ("w4a16", "w8a16", "fp8")
# the options that change a preset, with the value each takes when not given
QUANT_TUNING = {"bits": None, "group_size": None, "sym": None, "actorder": False}


def integer_in(lo: int, hi: int) -> Callable[[Any, str], int]:
    """An int in the closed interval [lo, hi]."""

    def check(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
        return int(value)

    return check


def check_quant(value: Any, name: str) -> Any:
    """A preset name (`QUANT_PRESETS`) or a `QuantSpec`; fp8 needs torch's float8 dtype."""
    from ..quant import QuantSpec, has_fp8

    if isinstance(value, QuantSpec):
        return value
    if not isinstance(value, str) or value not in QUANT_PRESETS:
        raise ValueError(
            f"{name} must be one of {', '.join(QUANT_PRESETS)} (or a QuantSpec), got {value!r}"
        )
    if value == "fp8" and not has_fp8():
        import torch

        raise ValueError(
            f"{name} fp8 needs torch.float8_e4m3fn, which this torch ({torch.__version__}) lacks"
        )
    return value


def quant_spec(values: Mapping[str, Any], meth, name: Name) -> Any:
    """The grid `values` (checked options, by name) ask for: the `quant` preset changed by
    bits/group_size/sym/actorder, or None. Refused: a tuning option without `quant`, one that
    does not apply to fp8, `quant` with a method that does not quantize (naming both)."""
    from ..quant import QuantSpec

    quant = values.get("quant")
    # those given: bits/group_size/sym other than None, actorder True
    tuned = {k: values.get(k, d) for k, d in QUANT_TUNING.items()}
    tuned = {k: v for k, v in tuned.items() if v is not QUANT_TUNING[k]}
    if quant is None:
        if tuned:
            key = next(iter(tuned))
            raise ValueError(
                f"{given(name, key, tuned[key])} tunes a quantization grid: give "
                f"{name('quant')} ({' | '.join(QUANT_PRESETS)})"
            )
        return None
    if not getattr(meth, "takes_quant", False):
        from ..methods import methods_where

        takers = ", ".join(methods_where("takes_quant")) or "none registered"
        raise ValueError(
            f"{given(name, 'quant', quant)} does not apply to method {meth.name!r}, which does "
            f"not quantize (methods that do: {takers})"
        )
    base = quant if isinstance(quant, QuantSpec) else QuantSpec.preset(quant)
    if base.fp8:
        for key in ("bits", "group_size"):
            if key in tuned:
                raise ValueError(
                    f"{given(name, key, tuned[key])} does not apply to "
                    f"{given(name, 'quant', quant)} (float8 e4m3, per-channel scales)"
                )
        if tuned.get("sym") is False:
            asym = "--asym" if name("sym").startswith("-") else given(name, "sym", False)
            raise ValueError(
                f"{asym}: an asymmetric grid does not apply to {given(name, 'quant', quant)} "
                "(no zero point)"
            )
    return dataclasses.replace(base, **tuned) if tuned else base
