"""The CUDA extension of `csrc/`: where its sources are, how it is built, loaded and emulated.

Nothing here runs at import. On a GPU the extension is compiled with ninja through
`torch.utils.cpp_extension.load` the first time a kernel runs (for the device's own sm_XY,
cached on disk by torch, one build at a time across processes), or taken from an
ahead-of-time build (`FASTPRUNE_BUILD_CUDA=1 pip install .` builds `fastprune._cuda_ext`).

`FASTPRUNE_CUDA_EMULATE=1` builds the same kernel sources with the host C++ compiler against
the emulated runtime of `csrc/emulation/` (threads as fibers, real warp shuffles and
barriers, misuse reported as a launch error) and lets the CUDA kernels take CPU tensors: the
CUDA counterpart of `TRITON_INTERPRET=1`, for testing without a GPU (slow; says nothing
about speed). Only the `kernel<<<cfg>>>(args)` launches are rewritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .. import csrc as _csrc

CSRC = Path(_csrc.__file__).resolve().parent  # installed as fastprune.csrc (package data)
BINDING = "binding.cpp"
KERNEL_SOURCES = ("obs_sweep.cu", "swap_search.cu")
EMULATE_ENV = "FASTPRUNE_CUDA_EMULATE"
EMULATED_SMS = 4
"""SM count the emulated swap search plans its grid for (small, so u-splits are exercised)."""

# `kernel<tpl><<<cfg>>>(` -> `fastprune_emu::launch(kernel<tpl>, cfg)(`
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<\s*(.*?)\s*>>>\s*\(", re.DOTALL)


def emulation_enabled() -> bool:
    """Whether FASTPRUNE_CUDA_EMULATE=1 asks for the CPU emulation of the CUDA backend."""
    return os.environ.get(EMULATE_ENV) == "1"


def _locked_build(name: str, sources: Callable[[Path], list[str]], **load_kwargs):
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


@functools.cache
def load_extension(device_index: int = 0):
    """Build (once per process, cached on disk by torch) and import the GPU extension."""
    try:
        from .. import _cuda_ext  # ahead-of-time build

        return _cuda_ext
    except ImportError:
        pass
    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA backend needs a CUDA device")
    major, minor = torch.cuda.get_device_capability(torch.device("cuda", device_index))
    arch = f"{major}{minor}"  # the device's own sm_XY
    return _locked_build(
        f"fastprune_cuda_sm{arch}",
        lambda _: [str(CSRC / s) for s in (BINDING, *KERNEL_SOURCES)],
        extra_cflags=["-O3"],  # torch picks the C++ standard its headers need
        extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
    )


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
    return _locked_build(
        "fastprune_cuda_emulated",
        _emulated_sources,
        extra_cflags=[
            "-O2",
            "-ffp-contract=off",  # no fused multiply-add the kernel did not ask for
            "-DFASTPRUNE_CPU_EMULATION",
            f"-I{CSRC / 'emulation'}",
            f"-I{CSRC}",
            "-Wno-unknown-pragmas",
        ],
    )


def extension_for(t: torch.Tensor):
    """The extension that runs kernels on `t`'s device (the emulated one for CPU tensors
    under FASTPRUNE_CUDA_EMULATE=1)."""
    if t.device.type == "cuda":
        return load_extension(t.device.index or 0)
    if emulation_enabled():
        return load_emulated_extension()
    raise ValueError(
        f"the CUDA kernels need CUDA tensors, got {t.device} "
        f"({EMULATE_ENV}=1 runs them on the CPU emulator)"
    )


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_context(t: torch.Tensor):
    """(device guard, stream handle, SM count) for launching on `t`'s device."""
    if t.device.type != "cuda":
        return contextlib.nullcontext(), 0, EMULATED_SMS
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    return torch.cuda.device(index), stream, _num_sms(index)
