"""CUDA backend: the hand-written kernels of `csrc/`, built lazily on first use.

Importing this module touches neither CUDA nor a compiler; the extension is compiled with
ninja through `torch.utils.cpp_extension.load` the first time a kernel runs (for the
device's own architecture, cached in torch's extension directory, guarded by a file lock so
two processes never build at once), or taken from an ahead-of-time build
(`FASTPRUNE_BUILD_CUDA=1 pip install .` builds `fastprune._cuda_ext`). With
`FASTPRUNE_CUDA_EMULATE=1` the same kernel sources run on CPU tensors through the emulator of
`fastprune.cuda_emulation` (for testing without a GPU; slow).

Only `obs_sweep` and `swap_search` are hand-written; the other ops of the backend reuse the
Triton kernels when Triton is installed, else the torch reference. Inputs outside what the
kernels support (float64, blocks wider than 256 columns, N:M with 32 % M != 0, cols >=
65536) fall back to the torch reference op, which computes the same contract.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import cuda_emulation
from .cuda_build import BINDING, CSRC, KERNEL_SOURCES, locked_build
from .ops.torch_ref import (
    torch_block_prune_mask,
    torch_column_losses,
    torch_obs_sweep,
    torch_swap_apply,
    torch_swap_search,
)


@functools.cache
def load_extension(device_index: int = 0):
    """Build (once per process, cached on disk by torch) and import the CUDA extension."""
    try:
        from . import _cuda_ext  # ahead-of-time build

        return _cuda_ext
    except ImportError:
        pass
    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA backend needs a CUDA device")
    device = torch.device("cuda", device_index)
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"{major}{minor}"  # the device's own sm_XY
    return locked_build(
        f"fastprune_cuda_sm{arch}",
        lambda _: [str(CSRC / s) for s in (BINDING, *KERNEL_SOURCES)],
        extra_cflags=["-O3"],  # torch picks the C++ standard its headers need
        extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
    )


def _ext(t: torch.Tensor):
    if t.device.type == "cuda":
        return load_extension(t.device.index or 0)
    if cuda_emulation.enabled():
        return cuda_emulation.load_emulated_extension()
    raise ValueError(
        f"the CUDA kernels need CUDA tensors, got {t.device} "
        f"({cuda_emulation.ENV}=1 runs them on the CPU emulator)"
    )


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_context(t: torch.Tensor):
    """(device guard, stream handle, SM count) for launching on `t`'s device."""
    if t.device.type != "cuda":
        return contextlib.nullcontext(), 0, cuda_emulation.EMULATED_SMS
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    return torch.cuda.device(index), stream, _num_sms(index)


def cuda_obs_sweep(W1, Hinv1, prune1, prune_n: int = 0, prune_m: int = 0):
    """CUDA version of `torch_obs_sweep` (same contract and return)."""
    count = W1.shape[1]
    supported = (
        W1.dtype == torch.float32
        and Hinv1.dtype == torch.float32
        and count <= 256
        and (prune_n == 0 or (32 % prune_m == 0 and count % prune_m == 0))
    )
    if not supported:
        return torch_obs_sweep(W1, Hinv1, prune1, prune_n, prune_m)
    ext = _ext(W1)
    guard, stream, _ = _launch_context(W1)
    with guard:
        return ext.obs_sweep(W1, Hinv1, prune1, prune_n, prune_m, stream)


def cuda_swap_search(w, keep, c, H, prune_n: int = 0, prune_m: int = 0, rows=None):
    """CUDA version of `torch_swap_search` (same contract; `rows` searches a subset)."""
    if w.dtype != torch.float32 or w.shape[1] >= 65536:
        return torch_swap_search(w, keep, c, H, prune_n, prune_m, rows=rows)
    ext = _ext(w)
    guard, stream, sms = _launch_context(w)
    with guard:
        return ext.swap_search(
            w.contiguous(),
            keep.contiguous(),
            c.contiguous(),
            H.contiguous(),
            prune_n,
            prune_m,
            rows,
            sms,
            stream,
        )


def _reused_ops() -> dict:
    """Ops without a hand-written CUDA kernel: Triton's if importable, else torch's."""
    ops = {
        "block_prune_mask": torch_block_prune_mask,
        "column_losses": torch_column_losses,
        "swap_apply": torch_swap_apply,
    }
    try:
        from .triton_kernels import OPS as triton_ops
    except ImportError:
        return ops
    ops.update({k: v for k, v in triton_ops.items() if k in ops})
    return ops


OPS = {**_reused_ops(), "obs_sweep": cuda_obs_sweep, "swap_search": cuda_swap_search}
