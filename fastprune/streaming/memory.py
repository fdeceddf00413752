"""Host memory for streaming: how much a new allocation may take, and building a model whose
parameters never take any (they live on the meta device until loaded)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def available_host_memory() -> int:
    """Bytes of host memory available to a new allocation (psutil, else /proc/meminfo)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency in practice
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the available host memory (no psutil, no MemAvailable)")


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to the meta device right away;
    buffers stay real, so values computed in `__init__` (rotary `inv_freq`) are correct.
    A parameter is allocated only for the moment it is registered (never initialised)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original
