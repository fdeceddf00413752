"""The exact least-squares refit on a fixed mask (`refit_masked`) against a per-row dense
solve, and `reconstruct="lstsq"` in the recipes."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_scale

import fastprune as fp
from fastprune.solvers.recipes import compose_layer
from fastprune.solvers.refit import damped_hessian, refit_masked
from fastprune.testing import random_layer

PATTERNS = [(0, 0), (2, 4), (4, 8)]


def layer(rows, cols, seed, **kw):
    W, H, _ = random_layer(rows, cols, generator=torch.Generator().manual_seed(seed), **kw)
    return W, H


def reference_refit(W, H, mask, percdamp=0.01):
    """Per row, `(Hd)_KK w_K = (w0 Hd)_K` solved densely in float64."""
    Hd, dead = damped_hessian(H.double(), percdamp)
    w0 = W.double().masked_fill(dead, 0.0)
    out = torch.zeros_like(w0)
    for i in range(W.shape[0]):
        K = mask[i].nonzero().squeeze(1)
        if K.numel():
            out[i, K] = torch.linalg.solve(Hd[K][:, K], (w0[i] @ Hd)[K])
    return out


def damped_row_losses(W, weight, H, percdamp=0.01):
    Hd, dead = damped_hessian(H.double(), percdamp)
    D = weight.double() - W.double().masked_fill(dead, 0.0)
    return ((D @ Hd) * D).sum(1)


def random_keep(rows, cols, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    if n:
        score = torch.rand(rows, cols // m, m, generator=g)
        keep = torch.ones_like(score, dtype=torch.bool)
        keep.scatter_(-1, score.argsort(-1)[..., :n], False)
        return keep.reshape(rows, cols)
    return torch.rand(rows, cols, generator=g) >= 0.5


@pytest.mark.parametrize("rows,cols", [(1, 24), (7, 40), (13, 64), (33, 96)])
@pytest.mark.parametrize("n,m", PATTERNS)
def test_refit_matches_a_dense_solve_per_row(rows, cols, n, m):
    W, H = layer(rows, cols, seed=rows + cols + n)
    keep = random_keep(rows, cols, n, m, seed=rows * cols)
    got, info = refit_masked(W, H, keep, iters=4 * cols, tol=1e-7)
    want = reference_refit(W, H, keep)
    assert_close_to_scale(got.double(), want, rtol=1e-4, what="refit weights")
    assert not got[~keep].any()
    assert info["refit_iters"] <= 4 * cols


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_refit_keeps_the_weights_dtype(dtype, rtol):
    W, H = layer(9, 48, seed=5)
    keep = random_keep(9, 48, 2, 4, seed=1)
    got, _ = refit_masked(W.to(dtype), H, keep, iters=200, tol=1e-7)
    assert got.dtype == dtype
    want = reference_refit(W.to(dtype).float(), H, keep)
    assert_close_to_scale(got.double(), want, rtol=rtol, what=f"refit {dtype}")


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_refit_never_raises_a_rows_damped_loss(iters):
    """Few iterations from a given start: every row ends at or below its start's loss."""
    W, H = layer(17, 64, seed=11, ill_conditioned=True)
    sg = fp.sparsegpt_layer(W, H, prune_n=2, prune_m=4, blocksize=16)
    got, info = refit_masked(W, H, sg.mask, sg.weight, iters=iters)
    before = damped_row_losses(W, sg.weight, H)
    after = damped_row_losses(W, got, H)
    assert (after <= before * (1 + 1e-6) + 1e-9).all()
    if iters == 0:
        assert torch.equal(got, sg.weight * sg.mask)
    assert info["refit_iters"] == iters or info["refit_residual"] <= 1e-4


def test_refit_lowers_sparsegpt_loss_on_its_mask():
    W, H = layer(24, 128, seed=2, columnar=True)
    sg = fp.sparsegpt_layer(W, H, prune_n=2, prune_m=4, blocksize=32)
    got, _ = refit_masked(W, H, sg.mask, sg.weight, iters=128, tol=1e-8)
    assert fp.layer_loss(W, got, H) < sg.loss * 0.999


def test_refit_dead_columns_end_at_zero_and_inputs_are_not_mutated():
    W, H = layer(6, 40, seed=3, dead=5)
    dead = H.diagonal() == 0
    keep = random_keep(6, 40, 0, 0, seed=4)
    W0, H0, k0 = W.clone(), H.clone(), keep.clone()
    got, _ = refit_masked(W, H, keep, iters=200, tol=1e-8)
    assert not got[:, dead].any()
    assert torch.equal(W, W0) and torch.equal(H, H0) and torch.equal(keep, k0)
    assert_close_to_scale(got.double(), reference_refit(W, H, keep), rtol=1e-4, what="dead")


def test_refit_non_finite_iterates_keep_their_start():
    """An H whose entries overflow the iteration: every row keeps its (finite) start."""
    W, H = layer(5, 16, seed=8)
    keep = random_keep(5, 16, 2, 4, seed=3)
    start = W * keep
    H = H.clone()
    H[0, 1] = H[1, 0] = float("inf")
    got, info = refit_masked(W, H, keep, start, iters=5)
    assert torch.isfinite(got).all()
    assert info["refit_rows_kept_start"] == 5 and torch.equal(got, start)


def test_refit_rows_with_nothing_kept_stay_zero():
    W, H = layer(4, 16, seed=6)
    keep = random_keep(4, 16, 0, 0, seed=2)
    keep[1] = False
    got, _ = refit_masked(W, H, keep, iters=50)
    assert torch.isfinite(got).all() and not got[1].any()


def test_refit_bad_arguments_are_named():
    W, H = layer(4, 16, seed=1)
    keep = torch.ones(4, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="iters"):
        refit_masked(W, H, keep, iters=-1)
    with pytest.raises(ValueError, match="mask"):
        refit_masked(W, H, keep[:, :8])
    with pytest.raises(ValueError, match="mask"):
        refit_masked(W, H, keep.float())
    with pytest.raises(ValueError, match="start"):
        refit_masked(W, H, keep, W[:2])
    with pytest.raises(ValueError, match="percdamp"):
        refit_masked(W, H, keep, percdamp=-1.0)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("select", ["sparsegpt", "rose", "wanda"])
def test_lstsq_reconstruction_is_the_optimum_on_the_refined_mask(select, n, m):
    """The refined mask with the least-squares weights: at or below the OBS reconstruction
    ("best") under the damped loss both minimise, and the dense per-row solve's weights."""
    W, H = layer(19, 64, seed=7 + n, columnar=True)
    kw = dict(prune_n=n, prune_m=m, select=select, refine="sparseswaps", max_swaps=3, blocksize=16)
    best = compose_layer(W, H, **kw, reconstruct="best")
    lsq = compose_layer(W, H, **kw, reconstruct="lstsq", refit_iters=300)
    assert torch.equal(lsq.mask, best.mask)
    assert lsq.info["result"] == "refit" and lsq.info["refit_iters"] <= 300
    assert lsq.loss == pytest.approx(fp.layer_loss(W, lsq.weight, H), rel=1e-6)
    assert lsq.info["loss_before_refit"] == pytest.approx(best.info["refine_loss_after"], rel=1e-6)
    assert damped_row_losses(W, lsq.weight, H).sum() <= damped_row_losses(
        W, best.weight, H
    ).sum() * (1 + 1e-6)
    assert_close_to_scale(lsq.weight.double(), reference_refit(W, H, lsq.mask), rtol=1e-3,
                          what="lstsq weights")  # fmt: skip
    assert not lsq.weight[~lsq.mask].any()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_exact_reconstruction_is_row_separable(n, m):
    """`rows=` gives exactly those rows of the whole solve (each row's refit is its own)."""
    W, H = layer(24, 64, seed=9)
    kw = dict(prune_n=n, prune_m=m, select="rose", refine="sparseswaps", max_swaps=2,
              blocksize=16, reconstruct="lstsq")  # fmt: skip
    whole = compose_layer(W, H, **kw)
    part = compose_layer(W, H, **kw, rows=slice(5, 17))
    assert torch.equal(part.mask, whole.mask[5:17])
    assert_close_to_scale(part.weight, whole.weight[5:17], rtol=1e-5, what="rows 5:17")


@pytest.mark.parametrize("n,m", PATTERNS)
def test_rounds_alternate_swaps_and_refits_never_above_one_round(n, m):
    """Rounds of swaps scored on the refitted weights, each followed by the refit: the layer
    loss is at most one round's, the mask keeps the pattern and the weights are the
    least-squares optimum on the final mask."""
    W, H = layer(23, 64, seed=11 + n, columnar=True)
    kw = dict(prune_n=n, prune_m=m, select="sparsegpt", refine="sparseswaps", max_swaps=3,
              blocksize=16, reconstruct="lstsq", refit_iters=300)  # fmt: skip
    one = compose_layer(W, H, **kw)
    many = compose_layer(W, H, **kw, rounds=4)
    assert 1 <= many.info["rounds"] <= 4 and "rounds" not in one.info
    assert many.loss <= one.loss * (1 + 1e-9)
    assert many.loss == pytest.approx(fp.layer_loss(W, many.weight, H), rel=1e-6)
    if n:
        kept = many.mask.reshape(23, -1, m).sum(-1)
        assert torch.all(kept == m - n)
    else:
        assert fp.masks.pruned_fraction(many.mask) == pytest.approx(0.5, abs=0.02)
    assert_close_to_scale(many.weight.double(), reference_refit(W, H, many.mask), rtol=1e-3,
                          what="weights after the rounds")  # fmt: skip
    assert not many.weight[~many.mask].any()


def test_a_rejected_round_is_undone_and_its_swaps_not_counted(monkeypatch):
    """A round whose refit does not lower the layer loss leaves the first round's mask, weights
    and swap count as they were."""
    import fastprune.solvers.recipes as recipes

    W, H = layer(23, 64, seed=11, columnar=True)
    kw = dict(select="sparsegpt", refine="sparseswaps", max_swaps=3, blocksize=16,
              reconstruct="lstsq", refit_iters=300)  # fmt: skip
    one = compose_layer(W, H, **kw)
    assert compose_layer(W, H, **kw, rounds=2).info["rounds"] == 2  # the round finds swaps
    calls = []

    def worse_after_the_first(W, H, mask, weight, **opts):
        calls.append(mask)
        out, info = refit_masked(W, H, mask, weight, **opts)
        return (out if len(calls) == 1 else torch.zeros_like(out)), info

    monkeypatch.setattr(recipes, "refit_masked", worse_after_the_first)
    undone = compose_layer(W, H, **kw, rounds=3)
    assert len(calls) == 2 and undone.info["rounds"] == 1
    assert torch.equal(undone.mask, one.mask) and torch.equal(undone.weight, one.weight)
    assert undone.info["refine_swaps"] == one.info["refine_swaps"]


def test_rounds_need_swaps_and_the_refit():
    W, H = layer(8, 32, seed=3)
    with pytest.raises(ValueError, match="rounds > 1.*refine"):
        compose_layer(W, H, select="sparsegpt", reconstruct="lstsq", rounds=2)
    with pytest.raises(ValueError, match="rounds > 1.*refine"):
        compose_layer(W, H, select="sparsegpt", refine="sparseswaps", reconstruct=True, rounds=2)
    with pytest.raises(ValueError, match="rounds"):
        compose_layer(W, H, select="sparsegpt", refine="sparseswaps", reconstruct="lstsq",
                      rounds=0)  # fmt: skip
    with pytest.raises(ValueError, match="rounds > 1"):
        fp.METHODS["fastprune"].check_options({"rounds": 3})
    opts = fp.METHODS["fastprune"].check_options({"rounds": 3, "refine": "sparseswaps"})
    assert not fp.METHODS["fastprune"].separable(2, opts)
