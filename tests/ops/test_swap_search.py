"""Op `swap_search` (SparseSwaps' best 1-swap per row) on every backend (torch, Triton,
CUDA) against its oracle: the exhaustive search over every (kept u, pruned p) pair in
float64 (`op_oracles.oracle_swap_search`). Ties between candidate swaps are allowed either
way: the checks compare Δ values and that the returned (u, p) is a legal pair achieving the
minimum, never the indices themselves.
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params
from op_oracles import check_swap_search, swap_state

BACKENDS = backend_params("swap_search")
backends = pytest.mark.parametrize("backend", BACKENDS, indirect=True)
TRITON = backend_params("swap_search", fast_only=True)[:1]


def _degenerate(w, keep, H):
    """Row 0 keeps everything, row 1 prunes everything (no candidate pair: +inf), row 2 is
    all zero (every Δ is 0); c recomputed for the new mask."""
    w, keep = w.clone(), keep.clone()
    keep[0], keep[1] = True, False
    w[2] = 0
    return w, keep, (w * ~keep) @ H


def _search(backend, w, keep, c, H, n=0, m=0, **kw):
    dev = backend.device
    out = backend.op("swap_search")(w.to(dev), keep.to(dev), c.to(dev), H.to(dev), n, m, **kw)
    return tuple(t.cpu() for t in out)


@backends
@pytest.mark.parametrize(
    "rows,cols,sparsity,layer",
    [
        (1, 16, 0.5, {}),  # one row
        (1, 53, 0.3, {}),
        (37, 53, 0.5, {}),  # primes
        (11, 37, 0.7, {}),
        (6, 130, 0.5, {}),
        (20, 256, 0.5, {}),  # cols a multiple of the tiles (Triton's unmasked H-tile path)
        (20, 600, 0.5, {}),  # CUDA: several u chunks and splits
        (9, 1030, 0.5, {}),
        (19, 67, 0.5, dict(columnar=True, blocksize=16)),
        (19, 67, 0.5, dict(ill_conditioned=True, dead=3)),
    ],
)
def test_swap_search_unstructured(backend, gen, rows, cols, sparsity, layer):
    w, keep, c, H = swap_state(gen, rows, cols, sparsity=sparsity, **layer)
    if rows > 2:
        w, keep, c = _degenerate(w, keep, H)
    dev = backend.device
    args = tuple(t.to(dev, copy=True) for t in (w, keep, c, H))
    out = tuple(t.cpu() for t in backend.op("swap_search")(*args))
    check_swap_search(out, w, keep, c, H, what=backend.name)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(args, (w, keep, c, H))), "modified"
    if rows > 2:
        assert torch.isinf(out[2][:2]).all() and out[2][2].item() == 0.0


@backends
@pytest.mark.parametrize(
    "rows,cols,n,m,layer",
    [
        (1, 16, 2, 4, {}),
        (37, 52, 2, 4, {}),
        (13, 56, 4, 8, {}),
        (9, 24, 1, 3, {}),  # group size not a power of two
        (21, 64, 2, 4, dict(ill_conditioned=True, dead=2)),
        (20, 600, 2, 4, {}),
        (20, 600, 4, 8, {}),
    ],
)
def test_swap_search_nm(backend, gen, rows, cols, n, m, layer):
    w, keep, c, H = swap_state(gen, rows, cols, n, m, **layer)
    if rows > 2:
        w, keep, c = _degenerate(w, keep, H)
    out = _search(backend, w, keep, c, H, n, m)
    check_swap_search(out, w, keep, c, H, n, m, what=f"{backend.name} {n}:{m}")


@backends
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_swap_search_row_subset(backend, gen, n, m):
    """`rows=` searches a subset of the full tensors, in the given order (permuted, with a
    row without a candidate pair): the same answer as searching gathered copies and as the
    full search at those rows; an empty subset gives empty results."""
    w, keep, c, H = swap_state(gen, 23, 40, n, m)
    w, keep, c = _degenerate(w, keep, H)
    rows = torch.cat([torch.tensor([1]), torch.randperm(23, generator=gen)[:8]])
    dev = backend.device
    sub = _search(backend, w, keep, c, H, n, m, rows=rows.to(dev))
    check_swap_search(sub, w, keep, c, H, n, m, rows=rows, what=f"{backend.name} rows=")
    copy = _search(backend, w[rows], keep[rows], c[rows], H, n, m)
    full = _search(backend, w, keep, c, H, n, m)
    fin = torch.isfinite(sub[2])
    assert torch.equal(sub[2], copy[2]) and torch.equal(sub[2], full[2][rows])
    for got, want in ((sub, copy), (sub, tuple(t[rows] for t in full))):
        assert torch.equal(got[0][fin], want[0][fin]) and torch.equal(got[1][fin], want[1][fin])
    empty = _search(backend, w, keep, c, H, n, m, rows=rows[:0].to(dev))
    assert all(t.shape == (0,) for t in empty)


@pytest.mark.parametrize("backend", BACKENDS[:2], indirect=True)
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_swap_search_float64(backend, gen, n, m):
    """float64 inputs are searched in float64, to float64 tolerances (CUDA: float32 only,
    see test_dispatch's limits)."""
    w, keep, c, H = swap_state(gen, 23, 40, n, m, dtype=torch.float64)
    rows = torch.randperm(23, generator=gen)[:9]
    out = _search(backend, w, keep, c, H, n, m, rows=rows.to(backend.device))
    assert out[2].dtype == torch.float64
    check_swap_search(out, w, keep, c, H, n, m, rows=rows, what=f"{backend.name} float64")


@backends
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_swap_search_strided_inputs(backend, gen, n, m):
    """w a row-strided view, keep and c stored column-major, H transposed: the same answer
    as contiguous inputs."""
    w, keep, c, H = swap_state(gen, 34, 48, n, m)
    ws = torch.zeros(68, 48)
    ws[::2] = w
    args = (ws[::2], keep.t().contiguous().t(), c.t().contiguous().t(), H.t())
    assert not any(t.is_contiguous() for t in args)
    out = _search(backend, *args, n, m)
    check_swap_search(out, w, keep, c, H, n, m, what=f"{backend.name} strided")


@pytest.mark.parametrize("backend", TRITON, indirect=True)
@pytest.mark.parametrize(
    "rows,cols,n,m,tiles",
    [
        # small tiles and several u splits: many tiles, ragged tails, the two-stage reduction
        (1, 53, 0, 0, dict(block_r=4, block_u=8, block_p=16, splits=3)),
        (11, 37, 0, 0, dict(block_r=4, block_u=8, block_p=16, splits=3)),
        (33, 96, 0, 0, dict(block_r=16, block_u=32, block_p=32)),  # the GPU defaults
        (5, 100, 0, 0, dict(block_r=16, block_u=32, block_p=32, splits=2)),
        (13, 56, 4, 8, dict(block_r=4, block_u=8)),  # groups straddle column chunks
    ],
)
def test_triton_swap_search_tiles(backend, gen, rows, cols, n, m, tiles):
    """The Triton launcher's tile sizes and u splits (tuning knobs) never change the answer."""
    w, keep, c, H = swap_state(gen, rows, cols, n, m)
    out = _search(backend, w, keep, c, H, n, m, **tiles)
    check_swap_search(out, w, keep, c, H, n, m, what=f"triton {tiles}")


@pytest.mark.parametrize("backend", BACKENDS[2:], indirect=True)
def test_cuda_swap_search_rows_out_of_range(backend, gen):
    w, keep, c, H = swap_state(gen, 5, 32)
    with pytest.raises(RuntimeError, match="rows must index rows of w"):
        _search(backend, w, keep, c, H, rows=torch.tensor([5], device=backend.device))
