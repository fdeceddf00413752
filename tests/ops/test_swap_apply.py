"""Op `swap_apply` (one chosen 1-swap per row, in place) on every backend that has one
(torch, Triton; the CUDA backend has no kernel of its own) against its oracle: the swap
applied to float64 copies (keep exactly, c within OP_RTOL), and `c` staying `(w*~keep) @ H`,
the bookkeeping the search relies on.
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params
from op_oracles import check_swap_apply, swap_state

BACKENDS = backend_params("swap_apply")
backends = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def _swaps(gen, keep, nrows):
    """Distinct rows (permuted) and, per row, a random kept u and pruned p."""
    rows = torch.randperm(keep.shape[0], generator=gen)[:nrows]
    u = torch.multinomial(keep[rows].float(), 1, generator=gen)[:, 0]
    p = torch.multinomial((~keep[rows]).float(), 1, generator=gen)[:, 0]
    return rows, u, p


def _apply(backend, w, keep, c, H, rows, u, p):
    """Run the backend's swap_apply on device copies; returns the updated (keep, c)."""
    dev = backend.device
    k, cc = keep.clone().to(dev), c.clone().to(dev)
    ret = backend.op("swap_apply")(w.to(dev), k, cc, H.to(dev), rows.to(dev), u.to(dev), p.to(dev))
    assert ret is None
    return k, cc


@backends
@pytest.mark.parametrize("rows,cols", [(1, 16), (29, 53), (12, 1100), (7, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_swap_apply(backend, gen, rows, cols, dtype):
    w, keep, c, H = swap_state(gen, rows, cols, dtype=dtype)
    keep[:, 0], keep[:, 1] = True, False  # every row has a kept and a pruned entry
    c = (w * ~keep) @ H
    sel, u, p = _swaps(gen, keep, max(1, rows // 2))
    w0, H0 = w.clone(), H.clone()
    k1, c1 = _apply(backend, w, keep, c, H, sel, u, p)
    check_swap_apply(k1, c1, w, keep, c, H, sel, u, p, what=backend.name)
    assert torch.equal(w, w0) and torch.equal(H, H0), "w and H are not touched"
    # c is again H r for the new mask
    exact = (w * ~k1.cpu()).double() @ H.double()
    assert ((c1.cpu().double() - exact).abs() <= 1e-4 * exact.abs().max()).all()


@backends
def test_swap_apply_empty_is_a_no_op(backend, gen):
    w, keep, c, H = swap_state(gen, 9, 24)
    none = torch.zeros(0, dtype=torch.long)
    k1, c1 = _apply(backend, w, keep, c, H, none, none, none)
    assert torch.equal(k1.cpu(), keep) and torch.equal(c1.cpu(), c)


@backends
def test_swap_apply_strided_rows(backend, gen):
    """w a row-strided view, H transposed, keep and c row-strided views updated in place
    (unit column stride: what Triton's kernel writes; see test_dispatch for the rest)."""
    w, keep, c, H = swap_state(gen, 16, 40)
    keep[:, 0], keep[:, 1] = True, False
    c = (w * ~keep) @ H
    sel, u, p = _swaps(gen, keep, 6)
    dev = backend.device
    big_w, big_k, big_c = (torch.zeros(32, 40, dtype=t.dtype) for t in (w, keep, c))
    big_w[1::2], big_k[1::2], big_c[1::2] = w, keep, c
    big_k, big_c = big_k.to(dev), big_c.to(dev)
    fn = backend.op("swap_apply")
    fn(big_w[1::2].to(dev), big_k[1::2], big_c[1::2], H.t().to(dev), sel.to(dev), u.to(dev),
       p.to(dev))  # fmt: skip
    check_swap_apply(big_k[1::2], big_c[1::2], w, keep, c, H, sel, u, p, what="strided")
    assert not big_k[::2].any() and not big_c[::2].any(), "rows outside the views untouched"
