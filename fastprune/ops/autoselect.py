"""How `backend="auto"` chooses between the Triton and CUDA kernels on a GPU: it times both
on a layer-sized problem of the ops that differ (the hand-written CUDA ones), once per
device, op set and software versions, and keeps the faster; the choice is cached in memory
and on disk (`$XDG_CACHE_HOME/fastprune/auto_backend.json`) so later processes skip the
timing. `FASTPRUNE_AUTO_BACKEND=triton|cuda` skips the measurement altogether.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..version import __version__

log = logging.getLogger("fastprune")

FAST_BACKENDS = ("triton", "cuda")
HANDWRITTEN_CUDA_OPS = ("obs_sweep", "swap_search")
"""Ops with a hand-written CUDA kernel; for every other op the CUDA backend reuses Triton's."""


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastprune" / "auto_backend.json"


def _versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"fastprune {__version__}, torch {torch.__version__}, triton {tv}"


def cache_key(device_name: str, ops: tuple[str, ...]) -> str:
    return f"{device_name} | {_versions()} | {','.join(ops)}"


def _problem(op: str, device: torch.device) -> tuple:
    """A layer-sized input for one op: a 4096-row block sweep, a 1024x2048 swap search."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if op == "obs_sweep":
        W = torch.randn(4096, 128, generator=g)
        A = torch.randn(128, 256, generator=g)
        hinv = torch.linalg.cholesky(torch.linalg.inv(A @ A.T / 256 + 0.1 * torch.eye(128))).T
        prune = torch.rand(4096, 128, generator=g) < 0.5
        return W.to(device), hinv.contiguous().to(device), prune.to(device), 0, 0
    if op == "swap_search":
        w = torch.randn(1024, 2048, generator=g)
        X = torch.randn(2048, 512, generator=g)
        H = X @ X.T / 512
        keep = torch.rand(1024, 2048, generator=g) < 0.5
        c = (w * ~keep) @ H
        return w.to(device), keep.to(device), c.to(device), H.to(device), 0, 0
    raise ValueError(f"no timing problem for op {op!r}")


def measure_on_device(backend: str, device: torch.device, ops: tuple[str, ...]) -> float:
    """Median milliseconds of one call of each op in `ops` (summed) with `backend`'s kernels
    (`fastprune.timing.measure`: warm-up calls first for JIT/extension builds, autotuning)."""
    from ..timing import measure
    from . import get_op

    total = 0.0
    for op in ops:
        fn: Callable = get_op(op, backend)
        args = _problem(op, device)
        total += measure(lambda fn=fn, args=args: fn(*args), device, warmup=2, rep=7).p50_ms
    return total


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: concurrent processes never read half a file
    except OSError as e:  # a read-only home is no reason to fail a pruning run
        log.warning("fastprune: could not cache the auto backend choice in %s: %s", path, e)


@functools.cache
def fastest_backend(device_name: str, device: torch.device, ops: tuple[str, ...]) -> str:
    """The faster of Triton and CUDA for `ops` on this device (measured once, then cached).

    A backend that fails to build or run (no nvcc, say) is left out with a warning; if both
    fail, the torch reference."""
    key = cache_key(device_name, ops)
    cached = _read_cache().get(key)
    if cached and cached.get("backend") in FAST_BACKENDS:
        return cached["backend"]
    log.warning(
        "fastprune: timing the triton and cuda kernels (%s) on %s to choose backend='auto' "
        "(once; cached in %s)",
        ", ".join(ops),
        device_name,
        cache_path(),
    )
    ms: dict[str, float] = {}
    for backend in FAST_BACKENDS:
        try:
            ms[backend] = measure_on_device(backend, device, ops)
        except Exception as e:  # noqa: BLE001 - any build/run failure rules the backend out
            log.warning("fastprune: backend %r left out of 'auto' on %s: %s", backend, device, e)
    if not ms:  # 'auto' never fails for lack of a fast backend
        log.warning("fastprune: no fast kernels ran on %s; 'auto' uses the torch reference", device)
        return "torch"
    best = min(ms, key=ms.__getitem__)
    _write_cache(key, {"backend": best, "median_ms": ms})
    return best


def choose_fast_backend(device: torch.device, ops: tuple[str, ...], available: list[str]) -> str:
    """Pick among the fast backends that can run `ops` on `device` (at least one)."""
    forced = os.environ.get("FASTPRUNE_AUTO_BACKEND")
    if forced in available:
        return forced
    if len(available) == 1:
        return available[0]
    differing = tuple(o for o in HANDWRITTEN_CUDA_OPS if o in ops)
    if not differing:  # the CUDA backend would run Triton's kernels anyway
        return "triton" if "triton" in available else available[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return fastest_backend(name, device, differing)
