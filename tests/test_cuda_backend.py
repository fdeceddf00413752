"""CUDA backend (csrc/): compile-only checks anywhere nvcc exists, lazy-build guarantees on
CPU, and the kernels against the torch reference on a GPU (skipped without one)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close, assert_masks_agree, relative_error

import fastprune as fp
from fastprune.ops import torch_obs_sweep, torch_swap_search

CSRC = Path(__file__).resolve().parents[1] / "csrc"
has_gpu = torch.cuda.is_available()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", ["obs_sweep.cu", "swap_search.cu"])
def test_kernels_compile_without_warnings(tmp_path, arch, source):
    """The torch-free kernel sources compile for Ampere and Hopper, warnings as errors."""
    cmd = [
        "nvcc",
        "-std=c++17",
        "-O3",
        f"-arch={arch}",
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall,-Wextra",
        "-c",
        str(CSRC / source),
        "-o",
        str(tmp_path / "k.o"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_import_touches_no_cuda_or_compiler():
    code = (
        "import sys, fastprune, fastprune.cuda_ops as c;"
        "assert c.load_extension.cache_info().currsize == 0;"
        "assert 'torch.utils.cpp_extension' not in sys.modules;"
        "print(sorted(c.OPS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "obs_sweep" in out.stdout and "swap_search" in out.stdout


@pytest.mark.skipif(has_gpu, reason="checks the error raised without a GPU")
def test_cuda_backend_without_gpu_is_a_clear_error():
    W, H, _ = fp.testing.random_layer(4, 32)
    with pytest.raises(fp.BackendUnavailableError, match="CUDA"):
        fp.sparsegpt_layer(W, H, backend="cuda")
    with pytest.raises(fp.BackendUnavailableError, match="CUDA"):
        fp.sparseswaps_layer(W, H, backend="cuda")


gpu = pytest.mark.skipif(not has_gpu, reason="needs a CUDA device")


@gpu
@pytest.mark.parametrize("rows,count", [(1, 32), (37, 100), (130, 128), (64, 256), (5, 17)])
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4), (4, 8)])
def test_obs_sweep_kernel_matches_reference(gen, rows, count, n, m):
    from fastprune.cuda_ops import cuda_obs_sweep

    if m and count % m:
        pytest.skip("count not divisible by M")
    W, H, _ = fp.testing.random_layer(rows, count, generator=gen)
    hinv = fp.inverse_hessian(H).hinv
    W, hinv = W.cuda(), hinv.cuda()
    prune1 = None
    if not n:
        prune1 = fp.ops.torch_block_prune_mask(W, hinv.diagonal(), 0.5)
    got = cuda_obs_sweep(W, hinv, prune1, n, m)
    ref = torch_obs_sweep(W.double(), hinv.double(), prune1, n, m)
    assert_masks_agree(got[2].cpu(), ref[2].cpu(), 0.999)
    if torch.equal(got[2].cpu(), ref[2].cpu()):
        for a, b, name in zip(got[:2] + got[3:], ref[:2] + ref[3:], ["Q1", "Err1", "loss"]):
            scale = b.abs().max().item() + 1e-30
            assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * scale, what=name)


@gpu
@pytest.mark.parametrize("rows,cols", [(1, 64), (37, 53), (20, 600), (9, 1030)])
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4), (4, 8)])
def test_swap_search_kernel_matches_reference(gen, rows, cols, n, m):
    from fastprune.cuda_ops import cuda_swap_search

    if m and cols % m:
        pytest.skip("cols not divisible by M")
    W, H, _ = fp.testing.random_layer(rows, cols, generator=gen)
    keep = fp.wanda_layer(W, H, 0.5, n, m).mask
    c = (W * ~keep) @ H
    W, H, keep, c = W.cuda(), H.cuda(), keep.cuda(), c.cuda()
    u, p, d = cuda_swap_search(W, keep, c, H, n, m)
    _, _, dref = torch_swap_search(W.double(), keep, c.double(), H.double(), n, m)
    scale = (W.abs().max() ** 2 * H.abs().max()).item() * 8
    assert_close(d.double().cpu(), dref.cpu(), rtol=1e-5, atol=1e-6 * scale, what="delta")
    finite = torch.isfinite(d)
    assert keep[finite.nonzero().flatten(), u[finite]].all()
    assert not keep[finite.nonzero().flatten(), p[finite]].any()
    rows_sel = torch.arange(rows - 1, -1, -2, device="cuda")
    u2, p2, d2 = cuda_swap_search(W, keep, c, H, n, m, rows=rows_sel)
    assert torch.equal(d2, d[rows_sel])


@gpu
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_layers_on_cuda_backend(gen, n, m):
    W, H, _ = fp.testing.random_layer(96, 384, columnar=True, generator=gen)
    for fn in (fp.sparsegpt_layer, fp.rose_layer):
        ref = fn(W, H, prune_n=n, prune_m=m, backend="torch")
        got = fn(W.cuda(), H.cuda(), prune_n=n, prune_m=m, backend="cuda")
        assert got.info["backend"] == "cuda"
        assert_masks_agree(got.mask.cpu(), ref.mask, 0.999)
        if torch.equal(got.mask.cpu(), ref.mask):
            assert relative_error(got.weight.cpu(), ref.weight) < 1e-5
    ref = fp.sparseswaps_layer(W, H, prune_n=n, prune_m=m, backend="torch", max_swaps=50)
    got = fp.sparseswaps_layer(
        W.cuda(), H.cuda(), prune_n=n, prune_m=m, backend="cuda", max_swaps=50
    )
    assert got.info["loss_after"] <= got.info["loss_before"]
    assert got.loss == pytest.approx(ref.loss, rel=1e-4)
