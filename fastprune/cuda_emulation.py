"""Run the hand-written CUDA kernels on the CPU: the same `csrc/*.cu` sources, built with the
host C++ compiler against the emulated runtime of `csrc/emulation/` (threads as fibers, real
warp shuffles and barriers, misuse reported as a launch error).

`FASTPRUNE_CUDA_EMULATE=1` makes `backend="cuda"` accept CPU tensors and use this build, as
`TRITON_INTERPRET=1` does for Triton: it is how the CUDA kernels are tested on machines
without a GPU. It is slow (each CUDA thread is a fiber) and says nothing about speed.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from .cuda_build import BINDING, CSRC, KERNEL_SOURCES, locked_build

ENV = "FASTPRUNE_CUDA_EMULATE"
EMULATED_SMS = 4
"""SM count the emulated swap search plans its grid for (small, so u-splits are exercised)."""

# `kernel<tpl><<<cfg>>>(` -> `fastprune_emu::launch(kernel<tpl>, cfg)(`
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<\s*(.*?)\s*>>>\s*\(", re.DOTALL)


def enabled() -> bool:
    """Whether FASTPRUNE_CUDA_EMULATE=1 asks for the CPU emulation of the CUDA backend."""
    return os.environ.get(ENV) == "1"


def rewrite_launches(source: str) -> str:
    """Turn CUDA's triple-chevron launches into calls of the emulator's launcher."""
    out = _LAUNCH.sub(r"fastprune_emu::launch(\1, \2)(", source)
    if "<<<" in out or ">>>" in out:
        raise ValueError("a kernel launch the emulation build cannot rewrite is left")
    return out


def _emulated_sources(build_dir: Path) -> list[str]:
    """The binding plus each kernel file with its launches rewritten, written to build_dir
    (only when changed, so ninja's cache stays valid)."""
    sources = [str(CSRC / BINDING)]
    for src in KERNEL_SOURCES:
        dst = build_dir / (Path(src).stem + "_emulated.cpp")
        text = rewrite_launches((CSRC / src).read_text())
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
        sources.append(str(dst))
    return sources


@functools.cache
def load_emulated_extension():
    """Build (once per process, cached on disk by torch) and import the emulated extension."""
    return locked_build(
        "fastprune_cuda_emulated",
        _emulated_sources,
        extra_cflags=[
            "-O2",
            "-DFASTPRUNE_CPU_EMULATION",
            f"-I{CSRC / 'emulation'}",
            f"-I{CSRC}",
            "-Wno-unknown-pragmas",
        ],
    )
