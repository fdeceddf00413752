"""Run the hand-written CUDA kernels on the CPU: the same `csrc/*.cu` sources, built with the
host C++ compiler against the emulated runtime of `csrc/emulation/` (threads as fibers, real
warp shuffles and barriers, misuse reported as a launch error).

`FASTPRUNE_CUDA_EMULATE=1` makes `backend="cuda"` accept CPU tensors and use this build, as
`TRITON_INTERPRET=1` does for Triton: it is how the CUDA kernels are tested on machines
without a GPU. It is slow (each CUDA thread is a fiber) and says nothing about speed.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
from pathlib import Path

from . import csrc as _csrc

CSRC = Path(_csrc.__file__).resolve().parent
KERNEL_SOURCES = ("obs_sweep.cu", "swap_search.cu")
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


@functools.cache
def load_emulated_extension():
    """Build (once per process, cached on disk by torch) and import the emulated extension."""
    from torch.utils.cpp_extension import _get_build_directory, load

    name = "fastprune_cuda_emulated"
    build_dir = Path(_get_build_directory(name, verbose=False))
    with open(build_dir / ".fastprune.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across processes
        try:
            sources = [str(CSRC / "binding.cpp")]
            for src in KERNEL_SOURCES:
                dst = build_dir / (Path(src).stem + "_emulated.cpp")
                text = rewrite_launches((CSRC / src).read_text())
                if not dst.exists() or dst.read_text() != text:  # keep ninja's cache valid
                    dst.write_text(text)
                sources.append(str(dst))
            return load(
                name=name,
                sources=sources,
                extra_cflags=[
                    "-O2",
                    "-DFASTPRUNE_CPU_EMULATION",
                    f"-I{CSRC / 'emulation'}",
                    f"-I{CSRC}",
                    "-Wno-unknown-pragmas",
                ],
                build_directory=str(build_dir),
                verbose=os.environ.get("FASTPRUNE_VERBOSE_BUILD") == "1",
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
