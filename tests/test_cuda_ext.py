"""The CUDA extension's build (`fastprune.ops.cuda_ext`): the kernel sources compile without
warnings wherever nvcc exists, the torch binding compiles without warnings of its own, and
importing fastprune touches neither CUDA nor a compiler (the build is lazy). The kernels
themselves are tested per op in tests/ops (on a GPU, else on the CPU emulator)."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fastprune.ops.cuda_ext import BINDING, CSRC, KERNEL_SOURCES


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", KERNEL_SOURCES)
def test_kernels_compile_without_warnings(tmp_path, arch, source):
    """The torch-free kernel sources compile for Ampere and Hopper, warnings as errors."""
    cmd = ["nvcc", "-std=c++17", "-O3", f"-arch={arch}", "-Werror", "all-warnings"]
    cmd += ["-Xcompiler", "-Wall,-Wextra", "-c", str(CSRC / source), "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _cuda_include() -> Path:
    """The CUDA toolkit's include directory (nvcc may be a wrapper script elsewhere)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        homes.append(str(Path(shutil.which("nvcc")).resolve().parent.parent))
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home) / "include"
    return Path("/nonexistent")


CUDA_INCLUDE = _cuda_include()


@pytest.mark.skipif(
    shutil.which("c++") is None or not (CUDA_INCLUDE / "cuda_runtime.h").exists(),
    reason="needs a C++ compiler and the CUDA toolkit's headers",
)
def test_binding_compiles_without_warnings():
    """The torch binding, as the real (non-emulated) build compiles it, has no warnings of
    its own (torch's headers are system headers)."""
    from torch.utils.cpp_extension import include_paths

    system = [*include_paths(), sysconfig.get_paths()["include"], str(CUDA_INCLUDE)]
    cmd = ["c++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror"]
    cmd += [f"-isystem{d}" for d in system]
    cmd += [f"-I{CSRC}", "-DTORCH_EXTENSION_NAME=fastprune_check", str(CSRC / BINDING)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]


def test_import_touches_no_cuda_or_compiler():
    code = (
        "import sys, fastprune, fastprune.ops.cuda_ops as c, fastprune.ops.cuda_ext as e;"
        "assert e.load_extension.cache_info().currsize == 0;"
        "assert e.load_emulated_extension.cache_info().currsize == 0;"
        "assert 'torch.utils.cpp_extension' not in sys.modules;"
        "print(sorted(c.OPS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "obs_sweep" in out.stdout and "swap_search" in out.stdout
