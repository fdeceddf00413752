"""Backend dispatch: which implementation of an op runs, and a record of what ran.

A backend module (`fastprune.triton_kernels`, `fastprune.ops.cuda_ops`) exposes
`OPS = {op: (fn, unsupported)}`: `fn` has the op's contract (see `fastprune.ops.<op>`), and
`unsupported(*args, **kwargs)` returns why `fn` cannot take those inputs (dtype, block width,
M, size), or None; and `BATCHED`, the ops whose `fn` also takes the op's batched form (a
leading layer dimension, `BATCH_RANK`; the torch reference takes every batched form); and
`QUANT`, the ops whose `fn` also takes the op's `quant=` option (`QUANT_OPS`; a call with
`quant` goes past a backend that does not declare it). A
solver resolves its backend once into a `Kernels` object; each call goes to the first
implementation of the backend's chain that takes the inputs (cuda -> triton -> torch,
triton -> torch, torch) and is recorded, so `r.info["kernels"]` maps every op that ran to
what ran it and `r.info["kernel_fallbacks"]` says why a named backend was passed over.
This is the one place where anything falls back.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from ..validation import BACKENDS
from .block_prune_mask import torch_block_prune_mask
from .column_losses import ColumnLosses, torch_column_losses
from .obs_sweep import ObsSweep, torch_obs_sweep
from .swap_apply import torch_swap_apply
from .swap_search import SwapSearch, torch_swap_search

OPS = ("obs_sweep", "block_prune_mask", "column_losses", "swap_search", "swap_apply")
# the ops with a batched form (a batch of independent layers), and the rank of their first
# argument in it (one more than in the one-layer form)
BATCH_RANK = {"obs_sweep": 3, "block_prune_mask": 3}
# the ops with a `quant=` option (kept weights rounded to a grid in the sweep)
QUANT_OPS = frozenset({"obs_sweep"})

TORCH_OPS: dict[str, Callable] = {
    "obs_sweep": torch_obs_sweep,
    "block_prune_mask": torch_block_prune_mask,
    "column_losses": torch_column_losses,
    "swap_search": torch_swap_search,
    "swap_apply": torch_swap_apply,
}

# the typed result of each op that returns several tensors (kernels return plain tuples)
_RESULTS = {"obs_sweep": ObsSweep, "column_losses": ColumnLosses, "swap_search": SwapSearch}

# the module of each fast backend, and the backends each one falls back to, in order
_FAST_MODULES = {"triton": "fastprune.triton_kernels", "cuda": "fastprune.ops.cuda_ops"}
_CHAINS = {"torch": ("torch",), "triton": ("triton", "torch"), "cuda": ("cuda", "triton", "torch")}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here (no GPU, no Triton, no compiler)."""


def _backend_module(backend: str):
    try:
        return importlib.import_module(_FAST_MODULES[backend])
    except ImportError as e:  # triton missing, ...
        raise BackendUnavailableError(f"backend={backend!r} is not available: {e}") from e


def backend_ops(backend: str) -> dict[str, tuple[Callable, Callable]]:
    """`{op: (fn, unsupported)}` of a fast backend; BackendUnavailableError if it won't import."""
    return _backend_module(backend).OPS


def backend_batched(backend: str) -> frozenset[str]:
    """The ops whose implementation by `backend` takes their batched form (`BATCH_RANK`)."""
    if backend == "torch":
        return frozenset(BATCH_RANK)
    return frozenset(getattr(_backend_module(backend), "BATCHED", ()))


def backend_quant(backend: str) -> frozenset[str]:
    """The ops whose implementation by `backend` takes their `quant=` option (`QUANT_OPS`)."""
    if backend == "torch":
        return QUANT_OPS
    return frozenset(getattr(_backend_module(backend), "QUANT", ()))


def is_batched(op: str, *args) -> bool:
    """Whether a call of `op` with `args` is its batched form."""
    rank = BATCH_RANK.get(op)
    return rank is not None and bool(args) and args[0].dim() == rank


def _device_problem(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device` at all (None if it can)."""
    if backend == "torch" or device.type == "cuda":
        return None
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); got {device}"
    from .cuda_ext import emulation_enabled

    if device.type == "cpu" and emulation_enabled():
        return None
    return f"CUDA kernels need CUDA tensors (or FASTPRUNE_CUDA_EMULATE=1 on CPU); got {device}"


def _check_ops(ops: tuple[str, ...]) -> None:
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; the ops are {', '.join(OPS)}")


def resolve_backend(backend: str, device: torch.device, ops: tuple[str, ...]) -> str:
    """Turn 'auto'/'torch'/'triton'/'cuda' into the backend whose chain runs `ops` on `device`.

    A backend named explicitly that cannot run on `device` raises BackendUnavailableError.
    'auto' uses the torch reference on CPU tensors; on a GPU, the faster of Triton and CUDA as
    timed once on that device (`ops.autoselect`), or torch if neither is installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {'/'.join(BACKENDS)}, got {backend!r}")
    _check_ops(ops)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        available = []
        for cand in _FAST_MODULES:
            try:
                table = backend_ops(cand)
            except BackendUnavailableError:
                continue
            if any(o in table for o in ops):
                available.append(cand)
        if not available:
            return "torch"
        from .autoselect import choose_fast_backend

        return choose_fast_backend(device, tuple(ops), available)
    why = _device_problem(backend, device)
    if why:
        raise BackendUnavailableError(f"backend={backend!r} cannot run: {why}")
    backend_ops(backend)  # raises if it does not import
    return backend


def get_op(name: str, backend: str) -> Callable:
    """The implementation backend `backend` itself provides for op `name` (torch's where it
    has none), unchecked and unrecorded: for timing one backend's kernel directly."""
    _check_ops((name,))
    if backend != "torch":
        table = backend_ops(backend)
        if name in table:
            return table[name][0]
    return TORCH_OPS[name]


def _always(*_args, **_kwargs) -> None:
    return None


class Kernels:
    """The ops of one solve, on one resolved backend, with a record of what ran.

    `k = Kernels("auto", W.device, ("obs_sweep",)); k("obs_sweep", W1, Hinv1, keep1)` runs the
    first implementation in the backend's chain that takes the inputs (for a batched call,
    the first that declares the batched form and takes them; for a call with `quant=`, the
    first that declares the option). `k.info()` is what a
    result reports: `{"kernels": {op: "cuda" | "triton" | "torch" | "cuda+torch" ...}}`
    (several names, in order of first use, where different calls took different
    implementations) and `"kernel_fallbacks": {op: reason}` where a named backend was
    passed over.
    """

    def __init__(self, backend: str, device: torch.device, ops: tuple[str, ...]) -> None:
        self.backend = resolve_backend(backend, device, ops)
        # per op: (backend, fn, unsupported, takes the batched form, takes quant=)
        self.chains: dict[str, list[tuple[str, Callable, Callable, bool, bool]]] = {}
        for op in ops:
            chain = []
            for name in _CHAINS[self.backend]:
                if name == "torch":
                    chain.append(("torch", TORCH_OPS[op], _always, True, True))
                    continue
                if _device_problem(name, device):
                    continue
                try:
                    table = backend_ops(name)
                except BackendUnavailableError:
                    continue
                if op in table:
                    takes = (op in backend_batched(name), op in backend_quant(name))
                    chain.append((name, *table[op], *takes))
            self.chains[op] = chain
        self.ran: dict[str, list[str]] = {}
        self.fallbacks: dict[str, str] = {}

    def __call__(self, op: str, *args, **kwargs):
        batched = is_batched(op, *args)
        quant = kwargs.get("quant") is not None
        if not quant:
            kwargs.pop("quant", None)  # backends without the option never see it
        for name, fn, unsupported, takes_batch, takes_quant in self.chains[op]:
            why = "no batched form" if batched and not takes_batch else None
            why = why or ("no quant option" if quant and not takes_quant else None)
            why = why or unsupported(*args, **kwargs)
            if why is None:
                ran = self.ran.setdefault(op, [])
                if name not in ran:
                    ran.append(name)
                out = fn(*args, **kwargs)
                typed = _RESULTS.get(op)
                return out if typed is None or isinstance(out, typed) else typed(*out)
            self.fallbacks.setdefault(op, f"{name}: {why}")
        raise AssertionError("unreachable: the torch reference takes every input")

    def op(self, name: str) -> Callable:
        """`k.op("obs_sweep")(...)` is `k("obs_sweep", ...)`."""
        return lambda *args, **kwargs: self(name, *args, **kwargs)

    def info(self) -> dict:
        out: dict = {"kernels": {op: "+".join(names) for op, names in self.ran.items()}}
        skipped = {op: why for op, why in self.fallbacks.items() if op in self.ran}
        if skipped:
            out["kernel_fallbacks"] = skipped
        return out
