"""Where the CUDA sources live and how they are compiled: one locked, cached
`torch.utils.cpp_extension.load` serves both the GPU extension (`cuda_ops`) and the CPU
emulated one (`cuda_emulation`). Nothing here runs at import."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from . import csrc as _csrc

CSRC = Path(_csrc.__file__).resolve().parent  # installed as fastprune.csrc (package data)
BINDING = "binding.cpp"
KERNEL_SOURCES = ("obs_sweep.cu", "swap_search.cu")


def locked_build(name: str, sources: Callable[[Path], list[str]], **load_kwargs):
    """Compile (ninja; cached on disk by torch) and import extension `name`, one build at a
    time across processes. `sources(build_dir)` lists the files to compile."""
    from torch.utils.cpp_extension import _get_build_directory, load

    build_dir = Path(_get_build_directory(name, verbose=False))
    with open(build_dir / ".fastprune.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return load(
                name=name,
                sources=sources(build_dir),
                build_directory=str(build_dir),
                verbose=os.environ.get("FASTPRUNE_VERBOSE_BUILD") == "1",
                **load_kwargs,
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
