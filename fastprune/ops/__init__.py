"""Ops layer: each op has a torch reference and, where written, fused Triton/CUDA versions.

Drivers resolve a backend once (`resolve_backend`) and call the ops by name; only the ops
differ between backends, never the driver.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from .torch_ref import (
    torch_block_prune_mask,
    torch_column_losses,
    torch_obs_sweep,
    torch_swap_apply,
    torch_swap_search,
)

OPS = ("block_prune_mask", "obs_sweep", "column_losses", "swap_search", "swap_apply")

_TORCH: dict[str, Callable] = {
    "block_prune_mask": torch_block_prune_mask,
    "obs_sweep": torch_obs_sweep,
    "column_losses": torch_column_losses,
    "swap_search": torch_swap_search,
    "swap_apply": torch_swap_apply,
}

# Which module provides a fast backend's ops; each must define `OPS: dict[name, callable]`.
_FAST_MODULES = {
    "triton": "fastprune.triton_kernels",
    "cuda": "fastprune.cuda_ops",
}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here (no GPU, no Triton, not implemented)."""


def _fast_ops(backend: str) -> dict[str, Callable]:
    try:
        mod = importlib.import_module(_FAST_MODULES[backend])
    except ImportError as e:  # triton missing, ...
        raise BackendUnavailableError(f"backend={backend!r} is not available: {e}") from e
    return getattr(mod, "OPS", {})


def _device_ok(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device` (None if it can)."""
    if backend == "triton":
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); got {device}"
    if backend == "cuda":
        if device.type == "cuda":
            return None
        from ..cuda_emulation import enabled as emulated

        if device.type == "cpu" and emulated():
            return None
        return f"CUDA kernels need CUDA tensors (or FASTPRUNE_CUDA_EMULATE=1 on CPU); got {device}"
    return None


def resolve_backend(backend: str, device: torch.device, ops: tuple[str, ...]) -> str:
    """Turn 'auto'/'torch'/'triton'/'cuda' into a backend that runs `ops` on `device`.

    A backend named explicitly that cannot run raises BackendUnavailableError. 'auto' uses the
    torch reference on CPU tensors; on a GPU, the faster of Triton and CUDA as timed once on
    that device (`ops.autoselect`), or the torch reference if neither is installed.
    """
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        available = []
        for cand in _FAST_MODULES:
            try:
                table = _fast_ops(cand)
            except BackendUnavailableError:
                continue
            if all(o in table for o in ops):
                available.append(cand)
        if not available:
            return "torch"
        from .autoselect import choose_fast_backend

        return choose_fast_backend(device, tuple(ops), available)
    if backend not in _FAST_MODULES:
        raise ValueError(f"backend must be one of auto/torch/triton/cuda, got {backend!r}")
    why = _device_ok(backend, device)
    if why:
        raise BackendUnavailableError(f"backend={backend!r} cannot run: {why}")
    table = _fast_ops(backend)
    missing = [o for o in ops if o not in table]
    if missing:
        raise BackendUnavailableError(
            f"backend={backend!r} has no implementation of {', '.join(missing)} yet; "
            "use backend='torch' or 'auto'"
        )
    return backend


def get_op(name: str, backend: str) -> Callable:
    """The implementation of op `name` for a resolved backend (torch ops fill any gap)."""
    if backend == "torch":
        return _TORCH[name]
    return _fast_ops(backend).get(name, _TORCH[name])


__all__ = [
    "BackendUnavailableError",
    "OPS",
    "get_op",
    "resolve_backend",
    "torch_block_prune_mask",
    "torch_column_losses",
    "torch_obs_sweep",
    "torch_swap_apply",
    "torch_swap_search",
]
