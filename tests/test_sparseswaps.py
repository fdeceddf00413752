"""SparseSwaps: exhaustive-search oracle, monotone loss, patterns and counts."""

import itertools

import pytest
import torch
from conftest import assert_close

import fastprune as fp
from fastprune.ops import torch_swap_apply, torch_swap_search

PATTERNS = [(0, 0), (2, 4), (4, 8)]


def row_loss(w, keep, H):
    r = (w * ~keep).double()
    return r @ H.double() @ r


def exhaustive_best(w, keep, H, m=0):
    """Best Δ of one row by trying every (kept u, pruned p) swap and recomputing the loss."""
    base = row_loss(w, keep, H)
    best = float("inf")
    cols = w.numel()
    for u, p in itertools.product(range(cols), range(cols)):
        if not keep[u] or keep[p] or (m and u // m != p // m):
            continue
        k = keep.clone()
        k[u], k[p] = False, True
        best = min(best, (row_loss(w, k, H) - base).item())
    return best


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("rows,cols", [(1, 8), (5, 16), (3, 24)])
def test_best_swap_equals_exhaustive_search(gen, n, m, rows, cols):
    W, H, _ = fp.testing.random_layer(rows, cols, generator=gen)
    H = H.double()
    W = W.double()
    keep = fp.wanda_layer(W, H, 0.5, n, m).mask
    c = (W * ~keep) @ H
    u, p, delta = torch_swap_search(W, keep, c, H, n, m)
    for i in range(rows):
        ex = exhaustive_best(W[i], keep[i], H, m)
        assert delta[i].item() == pytest.approx(ex, rel=1e-9, abs=1e-12)
        assert keep[i, u[i]] and not keep[i, p[i]]
        if m:
            assert u[i] // m == p[i] // m
        k = keep[i].clone()
        k[u[i]], k[p[i]] = False, True
        achieved = (row_loss(W[i], k, H) - row_loss(W[i], keep[i], H)).item()
        assert achieved == pytest.approx(ex, rel=1e-9, abs=1e-12)  # ties allowed either way


def test_swap_apply_updates_c_exactly(gen):
    W, H, _ = fp.testing.random_layer(6, 16, generator=gen)
    keep = fp.wanda_layer(W, H).mask
    c = (W * ~keep) @ H
    u, p, _ = torch_swap_search(W, keep, c, H)
    rows = torch.arange(6)
    torch_swap_apply(W, keep, c, H, rows, u, p)
    assert_close(c, (W * ~keep) @ H, rtol=1e-5, atol=1e-5, what="c after swap")


def test_no_candidate_rows_give_inf():
    W = torch.randn(2, 8)
    keep = torch.ones(2, 8, dtype=torch.bool)
    H = torch.eye(8)
    _, _, delta = torch_swap_search(W, keep, W * 0, H)
    assert torch.isinf(delta).all()


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("rows,cols", [(1, 32), (23, 64), (40, 96)])
def test_refinement_lowers_loss_keeps_counts_and_patterns(gen, n, m, rows, cols):
    W, H, _ = fp.testing.random_layer(rows, cols, generator=gen)
    warm = fp.wanda_layer(W, H, 0.5, n, m)
    r = fp.sparseswaps_layer(W, H, prune_n=n, prune_m=m)
    assert torch.equal(r.mask.sum(1), warm.mask.sum(1))
    assert r.info["loss_after"] <= r.info["loss_before"]
    assert r.info["loss_before"] == pytest.approx(warm.loss, rel=1e-5)
    assert r.loss == pytest.approx(fp.layer_loss(W, r.weight, H), rel=1e-5)
    assert torch.equal(r.weight, W * r.mask)
    if n:
        assert fp.check_nm_keep_mask(r.mask, n, m)
    if r.info["converged"]:  # a local optimum: no improving 1-swap is left
        Wd, Hd = W.double(), H.double()
        _, _, delta = torch_swap_search(Wd, r.mask, (Wd * ~r.mask) @ Hd, Hd, n, m)
        assert (delta > -1e-6 * (1 + r.loss)).all()


def test_loss_never_rises_step_by_step(gen):
    W, H, _ = fp.testing.random_layer(16, 48, generator=gen)
    mask = fp.magnitude_layer(W, sparsity=0.5).mask
    prev = None
    for k in range(0, 6):
        r = fp.sparseswaps_layer(W, H, mask=mask, max_swaps=k)
        assert r.info["steps"] <= k
        if prev is not None:
            assert r.loss <= prev + 1e-9
        prev = r.loss


def test_warm_start_from_any_mask_and_reconstruct(gen):
    W, H, _ = fp.testing.random_layer(12, 32, generator=gen)
    mask = torch.rand(12, 32, generator=gen) > 0.5
    r = fp.sparseswaps_layer(W, H, mask=mask)
    assert r.info["warm_start"] == "given mask"
    assert torch.equal(r.mask.sum(1), mask.sum(1))
    rec = fp.sparseswaps_layer(W, H, mask=mask, reconstruct=True)
    assert torch.equal(rec.mask, r.mask) and rec.info["reconstructed"]
    assert rec.loss <= r.loss * (1 + 1e-6)
    assert (rec.weight[~rec.mask] == 0).all()


def test_max_swaps_zero_is_warm_start(gen):
    W, H, _ = fp.testing.random_layer(8, 32, generator=gen)
    r = fp.sparseswaps_layer(W, H, max_swaps=0)
    assert torch.equal(r.mask, fp.wanda_layer(W, H).mask) and r.info["swaps"] == 0


def test_improves_on_wanda_noticeably(gen):
    W, H, _ = fp.testing.random_layer(32, 64, generator=gen)
    r = fp.sparseswaps_layer(W, H)
    assert r.info["loss_after"] < 0.99 * r.info["loss_before"]


def test_inputs_untouched(gen):
    W, H, _ = fp.testing.random_layer(8, 32, generator=gen)
    mask = fp.wanda_layer(W, H).mask
    W0, H0, m0 = W.clone(), H.clone(), mask.clone()
    fp.sparseswaps_layer(W, H, mask=mask)
    assert torch.equal(W, W0) and torch.equal(H, H0) and torch.equal(mask, m0)


@pytest.mark.parametrize("rows,cols", [(1, 256), (7, 300), (5, 517)])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_rowwise_and_dense_searches_agree(gen, rows, cols, sparsity):
    """The CPU per-row compacted search and the dense chunked one find the same best Δ
    (same tie order: ascending u, then p)."""
    from fastprune.ops.swap_search import _swap_search_dense, _swap_search_rowwise, _swap_terms

    W, H, _ = fp.testing.random_layer(rows, cols, generator=gen)
    keep = fp.wanda_layer(W, H, sparsity).mask
    keep[0, : cols // 3] = True  # rows with unequal counts too
    c = (W * ~keep) @ H
    a, b = _swap_terms(W, keep, c, H.diagonal())
    u1, p1, d1 = _swap_search_dense(a, b, W * keep, W * ~keep, H)
    u2, p2, d2 = _swap_search_rowwise(a, b, W, keep, H)
    assert_close(d2, d1, rtol=1e-5, atol=1e-6 * d1.abs().max().item(), what="delta")
    assert keep[torch.arange(rows), u2].all() and not keep[torch.arange(rows), p2].any()
