"""Op `column_losses` (ROSE's pre-pruning losses) on every backend that has one (torch,
Triton; the CUDA backend has no kernel of its own) against its float64 oracle: per block the
`S <= sorted(S_block)[int(numel*s)]` entries (N:M: each group's n lowest, a lower column
winning an exact tie), summed per column and per block. The selection is on the given
scores, exact in any precision, so there are no near-ties to allow.
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params
from op_oracles import PATTERNS, check_column_losses, layer

BACKENDS = backend_params("column_losses")
backends = pytest.mark.parametrize("backend", BACKENDS, indirect=True)
TRITON = backend_params("column_losses")[1:2]


def _scores(gen, rows, cols, columnar, dtype=torch.float32):
    W, H = layer(gen, rows, cols, "columnar" if columnar else "plain")
    return (W.abs() * torch.sqrt(torch.diagonal(H) / 2).reshape(1, -1)).to(dtype)


def _bounds(cols, width):
    return [(i, min(i + width, cols)) for i in range(0, cols, width)]


SHAPES = [(1, 64, 32), (37, 100, 32), (64, 256, 128), (13, 17, 8), (7, 24, 8)]
CASES = [  # rows, cols, ROSE blocksize, pattern (N:M where M divides cols)
    (r, c, bs, p)
    for r, c, bs in SHAPES
    for p in ("unstructured", "2:4", "4:8")
    if c % (PATTERNS[p][1] or 1) == 0
]


@backends
@pytest.mark.parametrize("rows,cols,bs,pattern", CASES)
def test_column_losses(backend, gen, rows, cols, bs, pattern):
    n, m = PATTERNS[pattern]
    S = _scores(gen, rows, cols, columnar=cols > 64)
    bounds = _bounds(cols, m or bs)
    out = backend.op("column_losses")(S.to(backend.device), bounds, 0.5, n, m)
    check_column_losses(out, S, bounds, 0.5, n, m, what=backend.name)


@pytest.mark.parametrize("backend", TRITON, indirect=True)
@pytest.mark.parametrize("rows,cols,bs,pattern", [c for c in CASES if c[:3] in SHAPES[:3]])
def test_column_losses_bfloat16_scores(backend, gen, rows, cols, bs, pattern):
    """bf16 scores are upcast exactly and selected and summed in float32 (many exact ties
    inside N:M groups: the lower column wins). The torch reference computes in S's dtype, so
    it is held to this only for float32/float64 scores."""
    n, m = PATTERNS[pattern]
    S = _scores(gen, rows, cols, columnar=cols > 64, dtype=torch.bfloat16)
    bounds = _bounds(cols, m or bs)
    out = backend.op("column_losses")(S.to(backend.device), bounds, 0.5, n, m)
    check_column_losses(out, S, bounds, 0.5, n, m, what=f"{backend.name} bf16")


@backends
def test_column_losses_ties_and_irregular_bounds(backend, gen):
    """Quantised scores (many exact ties at the threshold: `<=` keeps all of them), the
    unequal, permuted blocks ROSE hands the sweep after reordering, and columns outside
    every block (loss 0)."""
    S = torch.round(torch.rand(23, 78, generator=gen) * 16) / 16
    bounds = [(40, 70), (0, 32), (32, 40)]  # columns 70..77 in no block
    out = backend.op("column_losses")(S.to(backend.device), bounds, 0.6)
    check_column_losses(out, S, bounds, 0.6, what=f"{backend.name} ties")
    assert not out[0][70:].any()


@pytest.mark.parametrize(
    "backend",
    ["torch", *TRITON],
    indirect=True,
)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_column_losses_nm_exact_ties(backend, gen, n, m):
    """Scores with many exact ties inside N:M groups: the column sums follow the contract's
    tie rule (a lower column wins)."""
    S = torch.round(torch.rand(50, 64, generator=gen) * 4) / 4
    out = backend.op("column_losses")(S.to(backend.device), [], 0.5, n, m)
    check_column_losses(out, S, [], 0.5, n, m, what=f"{backend.name} N:M ties")


@backends
def test_column_losses_strided_scores(backend, gen):
    """S stored column-major and sliced out of a wider matrix."""
    S = _scores(gen, 21, 100, columnar=True).t().contiguous().t()[:, 4:68]
    assert not S.is_contiguous()
    for n, m in ((0, 0), (2, 4)):
        bounds = _bounds(64, m or 32)
        out = backend.op("column_losses")(S.to(backend.device), bounds, 0.5, n, m)
        check_column_losses(out, S, bounds, 0.5, n, m, what=f"{backend.name} strided")


@pytest.mark.parametrize("backend", backend_params("column_losses")[:1], indirect=True)
def test_column_losses_float64(backend, gen):
    """float64 scores to float64 tolerances (Triton: float32-only selection, see
    test_dispatch's limits: it falls back to torch)."""
    S = _scores(gen, 9, 64, False, torch.float64)
    for n, m in ((0, 0), (2, 4)):
        bounds = _bounds(64, m or 32)
        out = backend.op("column_losses")(S, bounds, 0.5, n, m)
        assert out[0].dtype == torch.float64
        check_column_losses(out, S, bounds, 0.5, n, m, what="float64")
