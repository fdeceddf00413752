"""The CPU emulator the CUDA kernels are tested on without a GPU (csrc/emulation, built by
`fastprune.ops.cuda_ext`): launches are rewritten for it, its warp and block primitives are
right, and the misuse that is undefined on a GPU (a bad shuffle mask, a shuffle with an
exited lane, a deadlocked barrier, a shared-memory race) shows up instead of passing
silently."""

import shutil
import subprocess
from pathlib import Path

import pytest

from fastprune.ops import cuda_ext

TESTS = Path(__file__).resolve().parent
EMULATION = cuda_ext.CSRC / "emulation"


def test_rewrite_launches():
    src = (
        "k<<<grid, block>>>(a, b);\n"
        "obs_kernel<S><<<g, 128, 0, stream>>>(W, \\\n    n);\n"
        "ns::other <<< dim3(r, t), 256 >>> (x);\n"
    )
    out = cuda_ext.rewrite_launches(src)
    assert out == (
        "fastprune_emu::launch(k, grid, block)(a, b);\n"
        "fastprune_emu::launch(obs_kernel<S>, g, 128, 0, stream)(W, \\\n    n);\n"
        "fastprune_emu::launch(ns::other, dim3(r, t), 256)(x);\n"
    )
    with pytest.raises(ValueError, match="cannot rewrite"):
        cuda_ext.rewrite_launches("k<<<g, b>>>;")


def test_package_sources_have_only_rewritable_launches():
    for name in cuda_ext.KERNEL_SOURCES:
        out = cuda_ext.rewrite_launches((cuda_ext.CSRC / name).read_text())
        assert "fastprune_emu::launch(" in out


@pytest.fixture(scope="module")
def probe_output(tmp_path_factory):
    if shutil.which("c++") is None:
        pytest.skip("needs a C++ compiler")
    tmp = tmp_path_factory.mktemp("probe")
    src = tmp / "probe.cpp"
    src.write_text(cuda_ext.rewrite_launches((TESTS / "cuda" / "emulation_probe.cu").read_text()))
    exe = tmp / "probe"
    cmd = ["c++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas"]
    build = subprocess.run(
        [*cmd, f"-I{EMULATION}", str(src), "-o", str(exe)], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return dict(line.split(" ", 1) for line in run.stdout.splitlines())


def test_warp_reduction_and_shuffles(probe_output):
    # warp sums of 0..127 in 32s; broadcast from lane 7, shift down by 3 (last lanes keep theirs)
    assert probe_output["warp_sum"] == "no error 496 1520 2544 3568"
    assert probe_output["broadcast_and_shift"] == "no error 70003 70031 70031"


def test_shared_memory_race_is_visible(probe_output):
    assert probe_output["shared_synced"] == "no error wrong=0"
    racy = probe_output["shared_racy"]
    assert racy.startswith("no error wrong=") and racy != "no error wrong=0"


@pytest.mark.parametrize(
    "case,message",
    [
        ("outside_mask", "lane outside its member mask"),
        ("after_exit", "names a lane that has exited"),
        ("deadlock", "deadlock"),
        ("too_many_threads", "invalid configuration"),
    ],
)
def test_misuse_is_reported(probe_output, case, message):
    assert message in probe_output[case]
