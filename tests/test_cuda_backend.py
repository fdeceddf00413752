"""CUDA backend (csrc/): compile-only checks anywhere nvcc exists, lazy-build guarantees on
CPU, and the kernels against the torch reference: on a GPU when there is one, else the same
kernel sources on the CPU emulator (FASTPRUNE_CUDA_EMULATE=1, fastprune.cuda_ext)."""

import os
import shutil
import subprocess
import sys
import sysconfig
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
    cmd += [f"-I{CSRC}", "-DTORCH_EXTENSION_NAME=fastprune_check", str(CSRC / "binding.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]


def test_import_touches_no_cuda_or_compiler():
    code = (
        "import sys, fastprune, fastprune.cuda_ops as c, fastprune.cuda_ext as e;"
        "assert e.load_extension.cache_info().currsize == 0;"
        "assert 'torch.utils.cpp_extension' not in sys.modules;"
        "print(sorted(c.OPS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "obs_sweep" in out.stdout and "swap_search" in out.stdout


def test_cuda_backend_on_cpu_tensors_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("FASTPRUNE_CUDA_EMULATE", raising=False)
    W, H, _ = fp.testing.random_layer(4, 32)
    with pytest.raises(fp.BackendUnavailableError, match="CUDA"):
        fp.sparsegpt_layer(W, H, backend="cuda")
    with pytest.raises(fp.BackendUnavailableError, match="CUDA"):
        fp.sparseswaps_layer(W, H, backend="cuda")
    from fastprune.cuda_ops import cuda_swap_search

    keep = torch.ones_like(W, dtype=torch.bool)
    with pytest.raises(ValueError, match="FASTPRUNE_CUDA_EMULATE"):
        cuda_swap_search(W, keep, W, H)


@pytest.fixture
def dev(monkeypatch):
    """Where the kernels run: the GPU, else the CPU emulator of the same sources."""
    if has_gpu:
        return torch.device("cuda")
    if shutil.which("c++") is None:
        pytest.skip("needs a GPU or a C++ compiler for the CUDA emulator")
    monkeypatch.setenv("FASTPRUNE_CUDA_EMULATE", "1")
    return torch.device("cpu")


@pytest.mark.parametrize("rows,count", [(1, 32), (37, 100), (130, 128), (64, 256), (5, 17)])
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4), (4, 8)])
def test_obs_sweep_kernel_matches_reference(gen, dev, rows, count, n, m):
    from fastprune.cuda_ops import cuda_obs_sweep

    if m and count % m:
        pytest.skip("count not divisible by M")
    W, H, _ = fp.testing.random_layer(rows, count, generator=gen)
    hinv = fp.inverse_hessian(H).hinv
    W, hinv = W.to(dev), hinv.to(dev)
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


def test_obs_sweep_kernel_strided_inputs(gen, dev):
    """A column block sliced out of a wider matrix (strided W, Hinv) is read in place."""
    from fastprune.cuda_ops import cuda_obs_sweep

    W, H, _ = fp.testing.random_layer(19, 96, generator=gen)
    hinv = fp.inverse_hessian(H).hinv
    W, hinv = W.to(dev)[:, 16:80], hinv.to(dev)[16:80, 16:80]
    prune1 = fp.ops.torch_block_prune_mask(W, hinv.diagonal(), 0.5)
    got = cuda_obs_sweep(W, hinv, prune1.t().contiguous().t())
    ref = torch_obs_sweep(W.double(), hinv.double(), prune1)
    assert torch.equal(got[2].cpu(), ref[2].cpu())
    assert_close(got[0].double(), ref[0], rtol=1e-5, atol=1e-6, what="Q1")


@pytest.mark.parametrize("rows,cols", [(1, 64), (37, 53), (20, 600), (9, 1030)])
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4), (4, 8)])
def test_swap_search_kernel_matches_reference(gen, dev, rows, cols, n, m):
    from fastprune.cuda_ops import cuda_swap_search

    if m and cols % m:
        pytest.skip("cols not divisible by M")
    W, H, _ = fp.testing.random_layer(rows, cols, generator=gen)
    keep = fp.wanda_layer(W, H, 0.5, n, m).mask
    c = (W * ~keep) @ H
    W, H, keep, c = W.to(dev), H.to(dev), keep.to(dev), c.to(dev)
    u, p, d = cuda_swap_search(W, keep, c, H, n, m)
    _, _, dref = torch_swap_search(W.double(), keep, c.double(), H.double(), n, m)
    scale = (W.abs().max() ** 2 * H.abs().max()).item() * 8
    assert_close(d.double().cpu(), dref.cpu(), rtol=1e-5, atol=1e-6 * scale, what="delta")
    finite = torch.isfinite(d)
    assert keep[finite.nonzero().flatten(), u[finite]].all()
    assert not keep[finite.nonzero().flatten(), p[finite]].any()
    rows_sel = torch.arange(rows - 1, -1, -2, device=dev)
    u2, p2, d2 = cuda_swap_search(W, keep, c, H, n, m, rows=rows_sel)
    assert torch.equal(d2, d[rows_sel])
    assert torch.equal(u2[torch.isfinite(d2)], u[rows_sel][torch.isfinite(d2)])
    with pytest.raises(RuntimeError, match="rows must index rows of w"):
        cuda_swap_search(W, keep, c, H, n, m, rows=torch.tensor([rows], device=dev))


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_kernels_on_degenerate_rows(gen, dev, n, m):
    """Rows with nothing to prune/swap (all kept, all pruned, all zero) give the reference's
    answer: no pruning error, delta = +inf where a row has no candidate pair."""
    from fastprune.cuda_ops import cuda_obs_sweep, cuda_swap_search

    W, H, _ = fp.testing.random_layer(6, 64, generator=gen)
    W[2] = 0
    keep = fp.wanda_layer(W, H, 0.5, n, m).mask
    keep[0], keep[1] = True, False
    c = (W * ~keep) @ H
    W, H, keep, c = W.to(dev), H.to(dev), keep.to(dev), c.to(dev)
    u, p, d = cuda_swap_search(W, keep, c, H, n, m)
    _, _, dref = torch_swap_search(W.double(), keep, c.double(), H.double(), n, m)
    assert torch.isinf(d[:2]).all() and torch.isinf(dref[:2]).all()
    assert_close(d[2:].double().cpu(), dref[2:].cpu(), rtol=1e-5, atol=1e-6, what="delta")
    hinv = fp.inverse_hessian(H.cpu()).hinv.to(dev)
    got = cuda_obs_sweep(W, hinv, keep if not n else None, n, m)
    ref = torch_obs_sweep(W.double(), hinv.double(), keep if not n else None, n, m)
    assert torch.equal(got[2].cpu(), ref[2].cpu())
    assert got[3][2].item() == 0.0  # an all-zero row
    if not n:
        assert got[3][0].item() == 0.0  # nothing pruned in row 0
    assert_close(got[3].double().cpu(), ref[3].cpu(), rtol=1e-5, atol=1e-6, what="loss")


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_layers_on_cuda_backend(gen, dev, n, m):
    # smaller on the emulator, where each CUDA thread is a fiber
    rows, cols, steps = (96, 384, 50) if dev.type == "cuda" else (40, 256, 6)
    W, H, _ = fp.testing.random_layer(rows, cols, columnar=True, generator=gen)
    for fn in (fp.sparsegpt_layer, fp.rose_layer):
        ref = fn(W, H, prune_n=n, prune_m=m, backend="torch")
        got = fn(W.to(dev), H.to(dev), prune_n=n, prune_m=m, backend="cuda")
        assert got.info["backend"] == "cuda"
        assert_masks_agree(got.mask.cpu(), ref.mask, 0.999)
        if torch.equal(got.mask.cpu(), ref.mask):
            assert relative_error(got.weight.cpu(), ref.weight) < 1e-5
    ref = fp.sparseswaps_layer(W, H, prune_n=n, prune_m=m, backend="torch", max_swaps=steps)
    got = fp.sparseswaps_layer(
        W.to(dev), H.to(dev), prune_n=n, prune_m=m, backend="cuda", max_swaps=steps
    )
    assert got.info["backend"] == "cuda"
    assert got.info["loss_after"] <= got.info["loss_before"]
    assert got.loss == pytest.approx(ref.loss, rel=1e-4)


@pytest.mark.parametrize("method", ["sparsegpt", "rose", "sparseswaps"])
def test_prune_model_on_cuda_backend(dev, method):
    """The whole pipeline (real activations, shared Hessians, every linear) on the CUDA
    kernels gives the torch reference's model."""
    pytest.importorskip("transformers")
    from pipeline_helpers import calib_ids, tiny_model

    opts = {"max_swaps": 3} if method == "sparseswaps" else {}
    calib = calib_ids(4, 24)
    ref, got = tiny_model("llama"), tiny_model("llama").to(dev)
    fp.prune_model(ref, calib, method, progress=False, backend="torch", **opts)
    rep = fp.prune_model(got, calib.to(dev), method, progress=False, backend="cuda", **opts)
    assert rep.achieved_sparsity == pytest.approx(0.5, abs=0.02)
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        if a.dim() == 2 and "embed" not in name and "lm_head" not in name:
            assert_masks_agree((b == 0).cpu(), a == 0, 0.999, what=name)
            assert relative_error(b.detach().cpu(), a.detach()) < 1e-4, name
