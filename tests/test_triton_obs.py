"""Triton SparseGPT/ROSE kernels (obs_sweep, block_prune_mask, column_losses) against the torch
reference ops, and the full sparsegpt_layer / rose_layer on backend="triton" vs "torch".

On CPU these run through the Triton interpreter (TRITON_INTERPRET=1, set by conftest); on a
GPU the same tests run natively on "cuda". Inputs are fresh random per run (`gen` fixture);
shapes are kept small because the interpreter is slow.

Masks: the Triton and torch paths compute the same float32 scores up to rounding, so a mask
entry may flip only where two scores are within float32 rounding of each other; with random
inputs that is rare, and the tests allow >= 99.9% agreement and compare weights on the rows
whose masks agree (rows of SparseGPT are independent, so a flip affects only its own row).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import assert_close, assert_masks_agree, relative_error  # noqa: E402

import fastprune as fp  # noqa: E402
from fastprune.hessian import inverse_hessian  # noqa: E402
from fastprune.masks import check_nm_keep_mask  # noqa: E402
from fastprune.ops import (  # noqa: E402
    torch_block_prune_mask,
    torch_column_losses,
    torch_obs_sweep,
)
from fastprune.testing import random_layer  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a CUDA GPU or TRITON_INTERPRET=1",
)

from fastprune.triton_kernels.block_prune_mask import triton_block_prune_mask  # noqa: E402
from fastprune.triton_kernels.column_losses import triton_column_losses  # noqa: E402
from fastprune.triton_kernels.obs_sweep import triton_obs_sweep  # noqa: E402
from fastprune.triton_kernels.radix_select import kth_smallest_blocks  # noqa: E402

HALF = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # one ulp (relative) of the dtype


def _layer(gen, rows, cols, kind="plain", blocksize=32, dtype=torch.float32, dead=0):
    W, H, _ = random_layer(
        rows,
        cols,
        columnar=kind == "columnar",
        ill_conditioned=kind == "ill",
        blocksize=blocksize,
        dead=dead,
        generator=gen,
    )
    return W.to(DEVICE, dtype), H.to(DEVICE)


def _block(gen, rows, count, kind, dtype=torch.float32):
    """A block `W1 [rows, count]` and its `Hinv1`, taken from the middle of a wider layer so
    Hinv1 is a strided view, as the driver passes it."""
    W, H = _layer(gen, rows, count + 16, kind, blocksize=count)
    hinv = inverse_hessian(H, 0.01).hinv
    W = W.to(dtype)
    return W[:, 8 : 8 + count], hinv[8 : 8 + count, 8 : 8 + count]


def _scale_close(actual, expected, rtol, what):
    """Entries within `rtol` of the tensor's scale (max |expected|): per-op 'within 1e-5'."""
    atol = rtol * expected.abs().max().item()
    assert_close(actual, expected, rtol=rtol, atol=atol, what=what)


# ------------------------------------------------------------------------------- obs_sweep

SWEEP_CASES = [
    # rows, count (a block; 100 % 32 leaves a partial block of 4), H kind
    (1, 32, "plain"),
    (37, 64, "columnar"),
    (37, 4, "plain"),
    (16, 128, "ill"),
    (5, 100, "ill"),  # a block that is not a power of two (padded tile)
    (8, 256, "columnar"),  # the largest supported blocksize
]


@pytest.mark.parametrize("rows,count,kind", SWEEP_CASES)
@pytest.mark.parametrize("pattern", ["unstructured", "fixed", "2:4", "4:8"])
def test_obs_sweep_matches_reference(gen, rows, count, kind, pattern):
    W1, Hinv1 = _block(gen, rows, count, kind)
    n, m = {"2:4": (2, 4), "4:8": (4, 8)}.get(pattern, (0, 0))
    if m and count % m:
        pytest.skip("N:M needs count divisible by M")
    if pattern == "unstructured":
        prune1 = torch_block_prune_mask(W1, Hinv1.diagonal(), 0.5)
    elif pattern == "fixed":
        prune1 = torch.rand(W1.shape, generator=gen).to(DEVICE) < 0.6
    else:
        prune1 = None
    Q, E, P, loss = triton_obs_sweep(W1, Hinv1, prune1, n, m)
    assert Q.dtype == torch.float32 and P.shape == W1.shape
    # the truth: the reference sweep in float64 with the same inputs
    Qr, Er, Pr, lossr = torch_obs_sweep(
        W1.double(), Hinv1.double(), None if prune1 is None else prune1, n, m
    )
    assert_masks_agree(P, Pr, 0.999, what="pruned")
    if n:
        assert check_nm_keep_mask(~P, n, m)
        # arithmetic check on exactly the Triton mask (removes any tie flip)
        Qr, Er, _, lossr = torch_obs_sweep(W1.double(), Hinv1.double(), P, 0, 0)
    else:
        assert torch.equal(P, prune1)
    _scale_close(Q, Qr, 1e-5, "Q1")
    _scale_close(E, Er, 1e-5, "Err1")
    _scale_close(loss, lossr, 1e-5, "loss_rows")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_obs_sweep_input_dtypes(gen, dtype):
    """Half inputs are upcast (float32 state); float64 inputs sweep in float64."""
    W1, Hinv1 = _block(gen, 19, 48, "plain", dtype=dtype)
    for n, m in ((0, 0), (2, 4)):
        prune1 = None if n else torch_block_prune_mask(W1.double(), Hinv1.diagonal().double(), 0.5)
        Q, E, P, loss = triton_obs_sweep(
            W1, Hinv1.to(dtype if dtype == torch.float64 else torch.float32), prune1, n, m
        )
        want = torch.float64 if dtype == torch.float64 else torch.float32
        assert Q.dtype == E.dtype == loss.dtype == want
        Qr, Er, Pr, lossr = torch_obs_sweep(W1.double(), Hinv1.double(), prune1, n, m)
        assert_masks_agree(P, Pr, 0.999, what="pruned")
        if n:
            Qr, Er, _, lossr = torch_obs_sweep(W1.double(), Hinv1.double(), P, 0, 0)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        _scale_close(Q, Qr, tol, "Q1")
        _scale_close(E, Er, tol, "Err1")


def test_obs_sweep_identity_hessian_is_magnitude(gen):
    """With Hinv = I there are no updates: Q = W masked, Err = pruned weights."""
    W1 = torch.randn(13, 40, generator=gen).to(DEVICE)
    Hinv1 = torch.eye(40, device=DEVICE)
    Q, E, K, loss = triton_obs_sweep(W1, Hinv1, None, 2, 4)  # K: keep-mask
    P = ~K
    groups = W1.abs().reshape(13, 10, 4)
    kth = groups.sort(-1).values[..., 1:2]
    assert torch.equal(K, (groups > kth).reshape(13, 40))
    assert torch.equal(Q, W1 * ~P) and torch.equal(E, W1 * P)
    assert_close(loss, (W1 * P).pow(2).sum(1) / 2, rtol=1e-6)


def test_obs_sweep_bad_args(gen):
    W1, Hinv1 = _block(gen, 4, 16, "plain")
    with pytest.raises(ValueError):
        triton_obs_sweep(W1, Hinv1, None)
    with pytest.raises(ValueError):
        triton_obs_sweep(W1, Hinv1[:8, :8], W1 > 0)
    with pytest.raises(ValueError):
        triton_obs_sweep(W1[:, :14], Hinv1[:14, :14], None, 2, 4)


# ------------------------------------------------------------------------ block mask, losses


@pytest.mark.parametrize("rows,cols", [(1, 100), (37, 128), (64, 33)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
def test_block_prune_mask(gen, rows, cols, sparsity):
    W1 = (torch.randn(rows, cols, generator=gen) * 0.05).to(DEVICE)
    d = (torch.rand(cols, generator=gen) + 0.2).to(DEVICE)
    got = triton_block_prune_mask(W1, d, sparsity)
    want = torch_block_prune_mask(W1, d, sparsity)
    # same float32 score (IEEE division in the kernel) and an exact selection: equal masks
    assert torch.equal(got, want)


def test_kth_smallest_exact_with_ties_and_signs(gen):
    """The radix selection equals kthvalue exactly: negative values, +-0, many ties."""
    X = torch.randn(29, 90, generator=gen)
    X[:, :30] = torch.round(X[:, :30] * 4) / 4  # heavy ties
    X[0, :5] = -0.0
    X[1, :5] = 0.0
    X = X.to(DEVICE)
    bounds = [(0, 30), (30, 61), (61, 90), (10, 11)]
    ks = [0, 450, 29 * 29 - 1, 17]
    got = kth_smallest_blocks(X, bounds, ks=ks)
    for b, ((i1, i2), k) in enumerate(zip(bounds, ks)):
        want = torch.kthvalue(X[:, i1:i2].flatten().cpu(), k + 1).values
        assert got[b].item() == want.item(), (b, got[b].item(), want.item())
    # k from the sparsity, computed on the device, is Python's int(numel * sparsity)
    got = kth_smallest_blocks(X, bounds, sparsity=0.7)
    for b, (i1, i2) in enumerate(bounds):
        k = int(29 * (i2 - i1) * 0.7)
        assert got[b].item() == torch.kthvalue(X[:, i1:i2].flatten().cpu(), k + 1).values.item()


def _rose_scores(gen, rows, cols, columnar, dtype):
    W, H = _layer(gen, rows, cols, "columnar" if columnar else "plain")
    S = W.abs() * torch.sqrt(torch.diagonal(H) / 2).reshape(1, -1)
    return S.to(dtype)


@pytest.mark.parametrize("rows,cols,bs", [(1, 64, 32), (37, 100, 32), (64, 256, 128)])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_losses(gen, rows, cols, bs, pattern, dtype):
    n, m = {"2:4": (2, 4), "4:8": (4, 8)}.get(pattern, (0, 0))
    if m and cols % m:
        pytest.skip("N:M needs cols divisible by M")
    S = _rose_scores(gen, rows, cols, columnar=cols > 64, dtype=dtype)
    bounds = [(i, min(i + (m or bs), cols)) for i in range(0, cols, m or bs)]
    col, blocks = triton_column_losses(S, bounds, 0.5, n, m)
    # the truth: the reference on the (exactly upcast) scores, in float64
    want_col, want_blocks = torch_column_losses(S.double(), bounds, 0.5, n, m)
    assert_close(blocks, want_blocks, rtol=1e-5, what="block loss")
    if n:
        # bf16 scores tie often inside a group; topk's order among ties is unspecified, the
        # kernel's is "lower column first": check column sums against that stable rule
        want_col = _nm_stable_losses(S.double(), n, m)
    _scale_close(col, want_col, 1e-5, "column loss")


def _nm_stable_losses(S, n, m):
    rows, cols = S.shape
    g = S.reshape(rows, cols // m, m)
    idx = torch.sort(g, dim=-1, stable=True).indices[..., :n]
    low = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (S * low.reshape(rows, cols)).sum(0)


def test_column_losses_ties_and_irregular_bounds(gen):
    """Quantised scores (many exact ties at the threshold: `<=` keeps all of them) and the
    unequal, permuted blocks ROSE hands the sweep after reordering."""
    S = torch.round(torch.rand(23, 70, generator=gen) * 16).to(DEVICE) / 16
    bounds = [(40, 70), (0, 32), (32, 40)]
    col, blocks = triton_column_losses(S, bounds, 0.6)
    want_col, want_blocks = torch_column_losses(S.double(), bounds, 0.6)
    assert_close(col, want_col, rtol=1e-6, what="column loss")
    assert_close(blocks, want_blocks, rtol=1e-6, what="block loss")


def test_column_losses_float64_fallback(gen):
    """float64 scores are outside the radix selection: the dispatcher runs the torch
    reference and records why."""
    S = _rose_scores(gen, 9, 64, False, torch.float64)
    bounds = [(0, 32), (32, 64)]
    for n, m in ((0, 0), (2, 4)):
        k = fp.ops.Kernels("triton", S.device, ("column_losses",))
        col, blocks = k("column_losses", S, bounds, 0.5, n, m)
        assert k.info()["kernels"] == {"column_losses": "torch"}
        assert "float64" in k.info()["kernel_fallbacks"]["column_losses"]
        want_col, want_blocks = torch_column_losses(S, bounds, 0.5, n, m)
        assert col.dtype == torch.float64
        assert_close(col, want_col, rtol=1e-12, what="column loss")
        assert_close(blocks, want_blocks, rtol=1e-12, what="block loss")


# ------------------------------------------------------------------------- full layer solvers


def _compare_layers(a, b, W):
    """Masks agree >= 99.9%; weights within 1e-5 relative on rows with identical masks
    (one element of the dtype's rounding for half-precision outputs)."""
    assert a.weight.dtype == b.weight.dtype == W.dtype
    assert_masks_agree(a.mask, b.mask, 0.999)
    rows = (a.mask == b.mask).all(1)
    assert rows.float().mean().item() >= 0.9
    wa, wb = a.weight[rows].double(), b.weight[rows].double()
    if W.dtype in HALF:
        assert_close(
            wa, wb, rtol=HALF[W.dtype] + 1e-5, atol=1e-5 * wb.abs().max().item(), what="weight"
        )
    else:
        assert relative_error(wa, wb) <= 1e-5
    assert abs(a.loss - b.loss) <= 1e-4 * abs(b.loss) + 1e-12


LAYER_CASES = [
    # solver, rows, cols, blocksize, pattern, H kind, dtype
    ("sparsegpt", 24, 100, 32, "unstructured", "plain", torch.float32),
    ("sparsegpt", 1, 64, 64, "2:4", "ill", torch.float32),
    ("sparsegpt", 37, 96, 32, "4:8", "columnar", torch.bfloat16),
    ("rose", 37, 128, 32, "unstructured", "columnar", torch.float32),
    ("rose", 16, 128, 64, "2:4", "columnar", torch.float16),
    ("rose", 24, 100, 32, "unstructured", "ill", torch.bfloat16),
    ("sparsegpt", 37, 256, 128, "2:4", "plain", torch.float32),
    ("sparsegpt", 24, 160, 64, "unstructured", "columnar", torch.float16),
    ("rose", 37, 96, 32, "4:8", "plain", torch.float32),
    ("rose", 1, 100, 32, "unstructured", "plain", torch.float32),
]


@pytest.mark.parametrize("solver,rows,cols,bs,pattern,kind,dtype", LAYER_CASES)
def test_layer_triton_vs_torch(gen, solver, rows, cols, bs, pattern, kind, dtype):
    n, m = {"2:4": (2, 4), "4:8": (4, 8)}.get(pattern, (0, 0))
    W, H = _layer(gen, rows, cols, kind, blocksize=bs, dtype=dtype, dead=2)
    fn = fp.sparsegpt_layer if solver == "sparsegpt" else fp.rose_layer
    a = fn(W, H, sparsity=0.5, prune_n=n, prune_m=m, blocksize=bs, backend="triton")
    b = fn(W, H, sparsity=0.5, prune_n=n, prune_m=m, blocksize=bs, backend="torch")
    assert a.info["backend"] == "triton" and b.info["backend"] == "torch"
    _compare_layers(a, b, W)
    if n:
        assert check_nm_keep_mask(a.mask, n, m)
    if solver == "rose":
        assert a.info["reordered"] == b.info["reordered"]
        assert abs(a.info["relative_range"] - b.info["relative_range"]) <= 1e-5


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_rose_reordered_triton_vs_torch(gen, pattern):
    """range_threshold=0 forces the reordering path (with cols=100 and blocksize 32 the
    reordered sweep blocks are irregular: the short block moves)."""
    n, m = {"2:4": (2, 4)}.get(pattern, (0, 0))
    W, H = _layer(gen, 19, 100, "columnar", blocksize=32)
    kw = dict(sparsity=0.5, prune_n=n, prune_m=m, blocksize=32, range_threshold=0.0)
    a = fp.rose_layer(W, H, backend="triton", **kw)
    b = fp.rose_layer(W, H, backend="torch", **kw)
    assert a.info["reordered"] and b.info["reordered"]
    _compare_layers(a, b, W)


def test_layer_fixed_mask_triton_vs_torch(gen):
    W, H = _layer(gen, 21, 72, "plain")
    keep = torch.rand(W.shape, generator=gen).to(DEVICE) > 0.4
    a = fp.sparsegpt_layer(W, H, mask=keep, blocksize=32, backend="triton")
    b = fp.sparsegpt_layer(W, H, mask=keep, blocksize=32, backend="torch")
    assert torch.equal(a.mask, keep) and torch.equal(b.mask, keep)
    _compare_layers(a, b, W)
