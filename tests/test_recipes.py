"""Recipes: compose_layer (selector -> swaps -> reconstruction), SparseSwaps on given kept
values, OWL layer-wise sparsity, and the `fastprune` method through the pipeline and CLI."""

from __future__ import annotations

import pytest
import torch

import fastprune as fp
from fastprune.masks import check_nm_keep_mask
from fastprune.pipeline.allocation import check_allocation, owl_block_sparsities
from fastprune.recipes import compose_layer, fastprune_layer
from fastprune.testing import random_layer

PATTERNS = [(0, 0), (2, 4), (4, 8)]


def layer(rows, cols, seed):
    W, H, _ = random_layer(rows, cols, generator=torch.Generator().manual_seed(seed))
    return W, H


def trace_loss(W, weight, H) -> float:
    D = (W - weight).double()
    return ((D @ H.double()) * D).sum().item()


def check_pattern_of(mask, sel_mask, n, m):
    """The refined mask prunes exactly what the selector's pruned, per row (and per group)."""
    assert torch.equal((~mask).sum(1), (~sel_mask).sum(1))
    if n:
        assert check_nm_keep_mask(mask, n, m)


@pytest.mark.parametrize("rows,cols", [(1, 24), (7, 40), (33, 64)])
@pytest.mark.parametrize("n,m", PATTERNS)
def test_swaps_on_given_values_lower_the_true_loss(rows, cols, n, m):
    W, H = layer(rows, cols, seed=rows * cols + n)
    sg = fp.sparsegpt_layer(W, H, 0.5, n, m, blocksize=16)
    values = torch.where(sg.mask, sg.weight, W)
    r = fp.sparseswaps_layer(W, H, sg.mask, prune_n=n, prune_m=m, values=values)
    # the loss before is SparseGPT's own result's, the loss after that of the returned weights
    assert r.info["loss_before"] == pytest.approx(trace_loss(W, sg.weight, H), rel=1e-4)
    assert r.loss == pytest.approx(trace_loss(W, r.weight, H), rel=1e-4, abs=1e-6)
    assert r.loss <= r.info["loss_before"] * (1 + 1e-6)
    assert torch.equal(r.weight[r.mask], values[r.mask]) and not r.weight[~r.mask].any()
    check_pattern_of(r.mask, sg.mask, n, m)


def test_swaps_on_values_equal_to_w_are_plain_sparseswaps():
    W, H = layer(20, 48, seed=3)
    a = fp.sparseswaps_layer(W, H, sparsity=0.5)
    b = fp.sparseswaps_layer(W, H, sparsity=0.5, values=W.clone())
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    assert a.loss == pytest.approx(b.loss, rel=1e-6)


def test_swaps_on_values_match_an_exhaustive_best_swap():
    """One step on a single row: the applied swap is the best over all pairs of the true
    loss with kept entries at `values`."""
    W, H = layer(1, 10, seed=5)
    sg = fp.sparsegpt_layer(W, H, 0.5)
    values = torch.where(sg.mask, sg.weight, W)
    r = fp.sparseswaps_layer(W, H, sg.mask, max_swaps=1, values=values)
    best = trace_loss(W, values * sg.mask, H)
    keep0 = sg.mask[0]
    for u in torch.nonzero(keep0).flatten().tolist():
        for p in torch.nonzero(~keep0).flatten().tolist():
            k = keep0.clone()
            k[u], k[p] = False, True
            best = min(best, trace_loss(W, values * k, H))
    assert r.loss == pytest.approx(best, rel=1e-5)


def test_swaps_values_errors():
    W, H = layer(4, 8, seed=1)
    with pytest.raises(ValueError, match="values"):
        fp.sparseswaps_layer(W, H, values=torch.zeros(4, 9))
    with pytest.raises(ValueError, match="values"):
        fp.sparseswaps_layer(W, H, values=torch.full((4, 8), float("nan")))


@pytest.mark.parametrize("select", ["magnitude", "wanda", "sparsegpt", "rose"])
def test_compose_without_steps_is_the_selector(select):
    W, H = layer(16, 64, seed=7)
    c = compose_layer(W, H, select=select, sparsity=0.5, blocksize=16)
    if select == "magnitude":
        ref = fp.magnitude_layer(W, 0.5, H=H)
    elif select == "wanda":
        ref = fp.wanda_layer(W, H, 0.5)
    elif select == "sparsegpt":
        ref = fp.sparsegpt_layer(W, H, 0.5, blocksize=16)
    else:
        ref = fp.rose_layer(W, H, 0.5, blocksize=16)
    assert torch.equal(c.mask, ref.mask) and torch.equal(c.weight, ref.weight)
    assert c.info["result"] == select and c.info["recipe"]["select"] == select


@pytest.mark.parametrize("n,m", PATTERNS)
def test_compose_score_selector_matches_sparseswaps_layer(n, m):
    W, H = layer(12, 48, seed=11)
    c = compose_layer(W, H, select="wanda", prune_n=n, prune_m=m, refine="sparseswaps")
    s = fp.sparseswaps_layer(W, H, sparsity=0.5, prune_n=n, prune_m=m)
    assert torch.equal(c.mask, s.mask) and torch.equal(c.weight, s.weight)
    c = compose_layer(
        W, H, select="wanda", prune_n=n, prune_m=m, refine="sparseswaps", reconstruct=True
    )
    s = fp.sparseswaps_layer(W, H, sparsity=0.5, prune_n=n, prune_m=m, reconstruct=True)
    assert torch.equal(c.mask, s.mask) and torch.allclose(c.weight, s.weight, atol=1e-6)


@pytest.mark.parametrize("rows,cols", [(1, 32), (9, 40), (31, 96)])
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("select", ["sparsegpt", "rose"])
def test_compose_refine_and_best(rows, cols, n, m, select):
    W, H = layer(rows, cols, seed=rows + cols + m)
    kw = dict(select=select, prune_n=n, prune_m=m, blocksize=16, refine="sparseswaps")
    sel = compose_layer(W, H, select=select, prune_n=n, prune_m=m, blocksize=16)
    ref = compose_layer(W, H, **kw)
    rec = compose_layer(W, H, **kw, reconstruct=True)
    best = compose_layer(W, H, **kw, reconstruct="best")
    for r in (ref, rec, best):
        check_pattern_of(r.mask, sel.mask, n, m)
        assert r.loss == pytest.approx(trace_loss(W, r.weight, H), rel=1e-3, abs=1e-6)
        assert not r.weight[~r.mask].any()
    # swaps on the selector's own weights never lose; 'best' is the lower of the two
    assert ref.loss <= sel.loss * (1 + 1e-5)
    assert best.loss == pytest.approx(min(ref.loss, rec.loss), rel=1e-6)
    assert best.info["result"] in ("refined", "reconstructed")
    assert torch.equal(ref.mask, best.mask) and torch.equal(ref.mask, rec.mask)


def test_compose_shares_an_inverse():
    W, H = layer(16, 64, seed=2)
    hinv = fp.inverse_hessian(H, 0.01)
    a = compose_layer(W, H, refine="sparseswaps", reconstruct=True, hinv=hinv)
    b = compose_layer(W, H, refine="sparseswaps", reconstruct=True)
    assert torch.equal(a.mask, b.mask) and torch.allclose(a.weight, b.weight, atol=1e-5)


def test_compose_overflowing_layer_is_rescaled():
    W, H = layer(8, 32, seed=4)
    big = compose_layer(W * 2.0**60, H, refine="sparseswaps", reconstruct="best")
    ref = compose_layer(W, H, refine="sparseswaps", reconstruct="best")
    assert torch.equal(big.mask, ref.mask)
    assert big.loss == pytest.approx(ref.loss * 2.0**120, rel=1e-4)


def test_fastprune_layer_is_the_recipe():
    W, H = layer(16, 64, seed=9)
    a = fastprune_layer(W, H, 0.5)
    b = compose_layer(W, H, **fp.RECIPE, sparsity=0.5)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(select="obs"), "select"),
        (dict(refine="swaps"), "refine"),
        (dict(refine="sparseswaps", refine_on="both"), "refine_on"),
        (dict(reconstruct="always"), "reconstruct"),
        (dict(select="gblm"), "G"),
    ],
)
def test_compose_errors(kw, match):
    W, H = layer(4, 16, seed=0)
    with pytest.raises(ValueError, match=match):
        compose_layer(W, H, **kw)


def test_compose_needs_h():
    W, _ = layer(4, 16, seed=0)
    with pytest.raises(ValueError, match="H is needed"):
        compose_layer(W, None, select="wanda")
    assert compose_layer(W, None, select="magnitude").mask.sum() == 32


# ------------------------------------------------------------------------------- OWL


def test_owl_keeps_the_total_and_the_spread():
    ratios = [0.01, 0.05, 0.02, 0.09, 0.03]
    params = [100, 100, 200, 100, 50]
    s = owl_block_sparsities(ratios, params, 0.7, 0.08)
    total = sum(x * p for x, p in zip(s, params)) / sum(params)
    assert total == pytest.approx(0.7, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)  # more outliers: less pruned


def test_owl_uniform_when_ratios_agree_and_errors():
    assert owl_block_sparsities([0.1, 0.1], [5, 5], 0.5, 0.1) == [0.5, 0.5]
    with pytest.raises(ValueError, match="owl_lambda"):
        owl_block_sparsities([0.0, 1.0], [1, 1], 0.05, 0.2)
    with pytest.raises(ValueError, match="allocation"):
        check_allocation("owl2", 5, 0.08)
    with pytest.raises(ValueError, match="owl_lambda"):
        check_allocation("owl", 5, 0.6)
    with pytest.raises(ValueError, match="owl_threshold"):
        check_allocation("owl", 0, 0.08)
