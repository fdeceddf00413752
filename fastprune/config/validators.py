"""Validators of declared options: `check(value, spelled name)` returns the value,
normalised, or raises a `ValueError`/`TypeError` that begins with the spelled name."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

from ..validation import check_int, check_patterns

# ------------------------------------------------------------------------------ validators


def _same(value: Any, choice: Any) -> bool:
    """`value` is `choice` (True and False only as themselves, never as 1 and 0)."""
    if isinstance(value, bool) or isinstance(choice, bool):
        return value is choice
    return value == choice


def one_of(choices: tuple | Callable[[], tuple]) -> Callable[[Any, str], Any]:
    def check(value: Any, name: str) -> Any:
        allowed = choices() if callable(choices) else choices
        if not any(_same(value, c) for c in allowed):
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value

    return check


def integer(minimum: int | None = None) -> Callable[[Any, str], int]:
    def check(value: Any, name: str) -> int:
        if minimum is None:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
            return int(value)
        return check_int(value, name, minimum)

    return check


def number_in(lo: float, hi: float) -> Callable[[Any, str], float]:
    """A real number in the open interval (lo, hi)."""

    def check(value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not lo < value < hi:
            raise ValueError(f"{name} must be a number in ({lo}, {hi}), got {value!r}")
        return float(value)

    return check


def flag_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda value, name: None if value is None else check(value, name)


def text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    return value


# targets / ignore: None, one glob pattern or a list of them (as a list)
patterns = check_patterns


def check_method(value: Any, name: str) -> str:
    from ..methods import METHODS

    if not isinstance(value, str) or value not in METHODS:
        raise ValueError(f"{name} must be one of {', '.join(METHODS)}, got {value!r}")
    return value


def check_device(spec: Any, name: str):
    """A device this machine has (None: the model's own)."""
    import torch

    if spec is None:
        return None
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} {spec!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {spec!r}: CUDA is not available on this machine")
    return spec


def method_names() -> str:
    from ..methods import METHODS

    return " | ".join(METHODS)


def methods_taking(option_name: str) -> str:
    from ..methods import methods_with

    return "/".join(methods_with(option_name))


MOE_CALIBRATIONS = ("routed", "all")


def check_moe_calibration(value: object, name: str = "moe_calibration") -> str:
    if value not in MOE_CALIBRATIONS:
        raise ValueError(f"{name} must be one of {', '.join(MOE_CALIBRATIONS)}, got {value!r}")
    return value  # type: ignore[return-value]
