"""The process group: whether one is active, its backend, timeout and start, and the
errors a failing or lost rank raises."""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ...solvers.core import active_world as active_world  # the one definition

DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "FASTPRUNE_DIST_TIMEOUT"
BACKEND_ENV = "FASTPRUNE_DIST_BACKEND"


class RankFailedError(RuntimeError):
    """Raised on every rank but the failing one when a rank failed in a guarded phase."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


class RankLostError(RuntimeError):
    """A collective failed: another rank died, or did not arrive within the timeout."""


def dist_timeout(value=None, name: str = "timeout") -> float:
    """The collective timeout in seconds: `value` if given, else `$FASTPRUNE_DIST_TIMEOUT`,
    else 1800. Must be a finite number > 0 (the error names `name` or the variable)."""
    if value is None:
        env = os.environ.get(TIMEOUT_ENV, "").strip()
        if not env:
            return DEFAULT_TIMEOUT_S
        value, name = env, TIMEOUT_ENV
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return seconds


def choose_backend(device=None) -> str:
    """`$FASTPRUNE_DIST_BACKEND` if set (gloo | nccl); else gloo when `device` is a CPU device
    or this machine has fewer CUDA devices than local ranks, else NCCL (one GPU per rank)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in ("gloo", "nccl"):
            raise ValueError(f"{BACKEND_ENV} must be gloo or nccl, got {forced!r}")
        return forced
    if device is not None and torch.device(device).type == "cpu":
        return "gloo"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local:
        return "nccl"
    return "gloo"


def init_from_env(timeout=None, device=None) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT; `fastprune prune --nproc` sets the same) when WORLD_SIZE > 1
    and none is initialised yet. Backend: `choose_backend(device)`; with CUDA each rank's
    current device is `cuda:LOCAL_RANK`. `timeout` (seconds; default `dist_timeout()`) bounds
    every collective, so a rank that dies makes the others fail within it. True if it did."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    seconds = dist_timeout(timeout)
    backend = choose_backend(device)
    cpu_only = device is not None and torch.device(device).type == "cpu"
    if torch.cuda.is_available() and not cpu_only:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    return True
