"""Input checks shared by every public entry point: clear errors that name the argument."""

from __future__ import annotations

import math
import numbers

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


def check_weight(W: object, name: str = "W") -> torch.Tensor:
    """A finite floating 2-D tensor."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {W.dtype}")
    if W.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, cols], got shape {tuple(W.shape)}")
    if W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(W.shape)}")
    check_finite(W, name)
    return W


def check_finite(T: torch.Tensor, name: str) -> None:
    """Reject NaN/inf instead of letting them propagate."""
    if not torch.isfinite(T).all():
        bad = (~torch.isfinite(T)).sum().item()
        raise ValueError(f"{name} contains {bad} NaN/inf value(s)")


def check_hessian(H: object, cols: int, device: torch.device, name: str = "H") -> torch.Tensor:
    """A finite square floating `[cols, cols]` tensor on `device`."""
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(H).__name__}")
    if not H.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {H.dtype}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{name} must be square [cols, cols], got shape {tuple(H.shape)}")
    if H.shape[0] != cols:
        raise ValueError(f"{name} is {tuple(H.shape)} but W has {cols} columns")
    check_device(H, device, name)
    check_finite(H, name)
    return H


def check_device(T: torch.Tensor, device: torch.device, name: str) -> None:
    if T.device != device:
        raise ValueError(f"{name} is on {T.device} but W is on {device}; put them on one device")


def check_sparsity(sparsity: object, name: str = "sparsity") -> float:
    """A real number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not math.isfinite(s) or not 0.0 <= s < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return s


def check_int(value: object, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_pattern(prune_n: object, prune_m: object, cols: int) -> tuple[int, int]:
    """Validate an N:M pattern; `(0, 0)` (or `prune_n == 0`) means unstructured."""
    n = check_int(prune_n, "prune_n")
    m = check_int(prune_m, "prune_m")
    if n == 0:
        return 0, 0
    if m == 0:
        raise ValueError(f"prune_m must be > 0 when prune_n={n} (N:M pattern)")
    if n >= m:
        raise ValueError(f"prune_n must be < prune_m for an N:M pattern, got {n}:{m}")
    if cols % m != 0:
        raise ValueError(f"W has {cols} columns, not divisible by prune_m={m}")
    return n, m


def check_percdamp(percdamp: object) -> float:
    if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real):
        raise TypeError(f"percdamp must be a number, got {percdamp!r}")
    p = float(percdamp)
    if not math.isfinite(p) or p < 0:
        raise ValueError(f"percdamp must be finite and >= 0, got {percdamp!r}")
    return p


def check_mask(mask: object, shape: torch.Size, device: torch.device, name: str = "mask"):
    """A bool `[rows, cols]` keep-mask (True = kept) on W's device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = kept), got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but W has {tuple(shape)}")
    check_device(mask, device, name)
    return mask


def check_scaler(
    scaler: object, cols: int, device: torch.device, name: str = "scaler_row"
) -> torch.Tensor:
    """A finite non-negative `[cols]` vector of squared input norms on W's device."""
    if not isinstance(scaler, torch.Tensor) or not scaler.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if scaler.numel() != cols:
        raise ValueError(f"{name} has {scaler.numel()} entries, W has {cols} columns")
    check_device(scaler, device, name)
    check_finite(scaler, name)
    if (scaler < 0).any():
        raise ValueError(f"{name} must be non-negative (squared input norms)")
    return scaler.reshape(-1)


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Solve in float64 if any input is float64, else float32 (never in half precision)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32
