"""SparseSwaps Triton kernels against the torch reference and an exhaustive oracle.

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1), on
a GPU machine compiled on CUDA tensors. Inputs are fresh random layers every run (`gen`).
Ties between candidate swaps are allowed either way: the checks compare Δ values and that the
returned (u, p) is a legal pair achieving the minimum, never the indices themselves.
"""

from __future__ import annotations

import pytest
import torch

import fastprune as fp
from fastprune.masks import check_nm_keep_mask, nm_prune_mask
from fastprune.ops import Kernels, torch_swap_apply, torch_swap_search
from fastprune.sparseswaps import SWAP_OPS, swap_refine
from fastprune.testing import random_layer

triton = pytest.importorskip("triton")
from fastprune.triton_kernels.swap_apply import triton_swap_apply  # noqa: E402
from fastprune.triton_kernels.swap_search import triton_swap_search  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 1e-5  # relative to the magnitude of the row's Δ terms (float32 rounding)

# small tiles and several u splits: many tiles, ragged tails, the two-stage reduction
SMALL_TILES = dict(block_r=4, block_u=8, block_p=16, splits=3)
GPU_TILES = dict(block_r=16, block_u=32, block_p=32)  # the launcher's CUDA defaults


def _state(rows, cols, gen, prune_n=0, prune_m=0, sparsity=0.5, dtype=torch.float32, **layer):
    """A random layer, a random keep-mask (N:M if asked) and `c = H r` for it."""
    W, H, _ = random_layer(rows, cols, generator=gen, dtype=dtype, **layer)
    if prune_n:
        keep = ~nm_prune_mask(torch.rand(rows, cols, generator=gen), prune_n, prune_m)
    else:
        keep = torch.rand(rows, cols, generator=gen) >= sparsity
    H = H.to(dtype)
    c = (W * ~keep) @ H
    return W.to(DEV), keep.to(DEV), c.to(DEV), H.to(DEV)


def _exhaustive(w, keep, c, H, prune_m=0):
    """Every pair's Δ in float64 (`inf` for illegal pairs) and each row's term magnitude."""
    w, c, H, keep = w.double().cpu(), c.double().cpu(), H.double().cpu(), keep.cpu()
    hd = H.diagonal()
    a = w * w * hd + 2 * w * c
    b = w * w * hd - 2 * w * c
    cross = 2 * w[:, :, None] * H[None] * w[:, None, :]
    D = a[:, :, None] + b[:, None, :] - cross
    legal = keep[:, :, None] & ~keep[:, None, :]
    if prune_m:
        g = torch.arange(w.shape[1]) // prune_m
        legal &= (g[:, None] == g[None, :])[None]
    D = D.masked_fill(~legal, float("inf"))
    mag = (a.abs()[:, :, None] + b.abs()[:, None, :] + cross.abs()).masked_fill(~legal, 0)
    return D, mag.flatten(1).amax(1)


def _check_best(u, p, delta, w, keep, c, H, prune_m=0, what=""):
    """(u, p, delta) is a legal pair whose Δ is the exhaustive minimum of its row."""
    D, scale = _exhaustive(w, keep, c, H, prune_m)
    u, p, delta, keep = u.cpu(), p.cpu(), delta.double().cpu(), keep.cpu()
    dmin = D.flatten(1).min(1).values
    none = torch.isinf(dmin)
    assert torch.equal(torch.isinf(delta), none), f"{what}: rows without a pair disagree"
    ok = ~none
    r = torch.arange(len(u))[ok]
    tol = RTOL * scale[ok] + 1e-30
    assert keep[r, u[ok]].all() and not keep[r, p[ok]].any(), f"{what}: illegal pair"
    if prune_m:
        assert torch.equal(u[ok] // prune_m, p[ok] // prune_m), f"{what}: pair crosses groups"
    err = (delta[ok] - dmin[ok]).abs()
    assert (err <= tol).all(), f"{what}: Δ off the minimum by {(err / tol).max():.3g} x tol"
    achieved = (D[r, u[ok], p[ok]] - dmin[ok]).abs()
    assert (achieved <= tol).all(), f"{what}: returned pair does not achieve the minimum"
    return scale


@pytest.mark.parametrize(
    "rows,cols,sparsity,tiles,layer",
    [
        (1, 16, 0.5, {}, {}),
        (1, 53, 0.3, SMALL_TILES, {}),
        (37, 53, 0.5, {}, {}),
        (11, 37, 0.7, SMALL_TILES, {}),
        (6, 130, 0.5, {}, {}),
        (20, 256, 0.5, {}, {}),  # cols a multiple of the tiles: the unmasked H-tile path
        (33, 96, 0.5, GPU_TILES, {}),
        (5, 100, 0.5, dict(GPU_TILES, splits=2), {}),
        (19, 67, 0.5, {}, dict(columnar=True, blocksize=16)),
        (19, 67, 0.5, {}, dict(ill_conditioned=True, dead=3)),
    ],
)
def test_search_unstructured(rows, cols, sparsity, tiles, layer, gen):
    w, keep, c, H = _state(rows, cols, gen, sparsity=sparsity, **layer)
    if rows > 2:  # a row with nothing pruned and one with nothing kept: no candidate pair
        keep[0] = True
        keep[1] = False
        c = (w * ~keep) @ H
    u, p, d = triton_swap_search(w, keep, c, H, **tiles)
    scale = _check_best(u, p, d, w, keep, c, H, what="triton")
    ur, pr, dr = torch_swap_search(w, keep, c, H)
    fin = torch.isfinite(dr).cpu()
    assert torch.equal(torch.isfinite(d).cpu(), fin)
    diff = (d.cpu().double() - dr.cpu().double())[fin].abs()
    assert (diff <= RTOL * scale[fin]).all(), "triton Δ differs from torch_swap_search"


@pytest.mark.parametrize(
    "rows,cols,n,m,tiles,layer",
    [
        (1, 16, 2, 4, {}, {}),
        (37, 52, 2, 4, {}, {}),
        (13, 56, 4, 8, dict(block_r=4, block_u=8), {}),  # groups straddle column chunks
        (9, 24, 1, 3, {}, {}),  # group size not a power of two
        (21, 64, 2, 4, {}, dict(ill_conditioned=True, dead=2)),
    ],
)
def test_search_nm(rows, cols, n, m, tiles, layer, gen):
    w, keep, c, H = _state(rows, cols, gen, prune_n=n, prune_m=m, **layer)
    u, p, d = triton_swap_search(w, keep, c, H, n, m, **tiles)
    scale = _check_best(u, p, d, w, keep, c, H, prune_m=m, what=f"{n}:{m}")
    _, _, dr = torch_swap_search(w, keep, c, H, n, m)
    diff = (d.cpu().double() - dr.cpu().double()).abs()
    assert (diff <= RTOL * scale).all(), "triton Δ differs from torch_swap_search"


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_search_row_subset_and_float64(n, m, gen):
    """`rows=` searches a subset of the full tensors in place of gathered copies; float64
    inputs are searched in float64."""
    w, keep, c, H = _state(23, 40, gen, prune_n=n, prune_m=m, dtype=torch.float64)
    rows = torch.randperm(23, generator=gen)[:9].to(DEV)
    u, p, d = triton_swap_search(w, keep, c, H, n, m, rows=rows)
    assert d.dtype == torch.float64
    _check_best(u, p, d, w[rows], keep[rows], c[rows], H, prune_m=m, what="rows=")
    u2, p2, d2 = triton_swap_search(w[rows], keep[rows], c[rows], H, n, m)
    assert torch.equal(d, d2) and torch.equal(u, u2) and torch.equal(p, p2)


@pytest.mark.parametrize("rows,cols", [(1, 16), (29, 53), (12, 1100)])
def test_swap_apply_matches_torch(rows, cols, gen):
    w, keep, c, H = _state(rows, cols, gen)
    keep[:, 0], keep[:, 1] = True, False  # every row has a kept and a pruned entry
    c = (w * ~keep) @ H
    sel = torch.randperm(rows, generator=gen)[: max(1, rows // 2)].to(DEV)
    ks, ps = keep[sel].cpu(), ~keep[sel].cpu()
    u = torch.multinomial(ks.float(), 1, generator=gen)[:, 0].to(DEV)
    p = torch.multinomial(ps.float(), 1, generator=gen)[:, 0].to(DEV)
    k1, c1 = keep.clone(), c.clone()
    k2, c2 = keep.clone(), c.clone()
    triton_swap_apply(w, k1, c1, H, sel, u, p)
    torch_swap_apply(w, k2, c2, H, sel, u, p)
    assert torch.equal(k1, k2)
    atol = 1e-6 * c2.abs().max().item()
    assert ((c1 - c2).abs() <= 1e-5 * c2.abs() + atol).all()
    # c is again H r for the new mask (the bookkeeping the search relies on)
    exact = (w * ~k1).double() @ H.double()
    assert ((c1.double() - exact).abs() <= 1e-4 * exact.abs().max()).all()
    triton_swap_apply(w, k1, c1, H, sel[:0], u[:0], p[:0])  # empty: a no-op


@pytest.mark.parametrize(
    "rows,cols,n,m",
    [(1, 64, 0, 0), (37, 53, 0, 0), (29, 52, 2, 4), (16, 64, 4, 8), (96, 256, 0, 0)],
)
def test_full_run_matches_torch(rows, cols, n, m, gen):
    W, H, _ = random_layer(rows, cols, generator=gen, device=DEV)
    kw = dict(prune_n=n, prune_m=m, sparsity=0.5)
    rt = fp.sparseswaps_layer(W, H, backend="triton", **kw)
    rr = fp.sparseswaps_layer(W, H, backend="torch", **kw)
    assert rt.info["backend"] == "triton"
    lt, lr = rt.info["loss_after"], rr.info["loss_after"]
    assert abs(lt - lr) <= 1e-5 * abs(lr), f"final loss triton {lt} vs torch {lr}"
    for r in (rt, rr):
        assert r.info["loss_after"] <= r.info["loss_before"]
    warm = fp.wanda_layer(W, H, sparsity=0.5, prune_n=n, prune_m=m).mask
    assert torch.equal(rt.mask.sum(1), warm.sum(1)), "per-row kept counts changed"
    if n:
        assert check_nm_keep_mask(rt.mask, n, m)
    assert torch.equal(rt.weight, W.masked_fill(~rt.mask, 0))


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_loss_never_rises_per_step(n, m, gen):
    """The exact (float64) loss after each step of the triton-backed driver never rises."""
    W, H, _ = random_layer(12, 48, generator=gen, device=DEV)
    keep0 = fp.wanda_layer(W, H, sparsity=0.5, prune_n=n, prune_m=m).mask

    def loss(keep):
        r = (W * ~keep).double()
        return ((r @ H.double()) * r).sum().item()

    prev = loss(keep0)
    for steps in range(1, 40):
        keep, info = swap_refine(
            W, H, keep0, n, m, max_swaps=steps, kernels=Kernels("triton", W.device, SWAP_OPS)
        )
        cur = loss(keep)
        assert cur <= prev + 1e-12 * abs(prev), f"loss rose at step {steps}: {prev} -> {cur}"
        prev = cur
        if info["converged"]:
            break
