"""ROSE: reordering decision, exact un-permutation, N:M, agreement with the research code."""

import pytest
import torch
from conftest import assert_close, assert_weights_agree_where_masks_do
from op_oracles import check_rose_solve

import fastprune as fp
from fastprune.ops import torch_column_losses
from fastprune.original import original_rose, original_sparsegpt
from fastprune.solvers.core import wanda_score
from fastprune.solvers.obs import block_bounds
from fastprune.solvers.rose import relative_range, rose_permutation


@pytest.mark.parametrize("rows,cols,bs", [(1, 128, 32), (29, 192, 64), (64, 256, 128)])
def test_columnar_layer_reorders_and_matches_original(gen, rows, cols, bs):
    """Block scales two decades apart (`columnar`): the range is far above 0.5 for every
    draw. The result is the research loop on ROSE's order along its own mask (every decision
    the rule's up to near-ties), and the original's weights on every row whose mask agrees."""
    W, H, _ = fp.testing.random_layer(rows, cols, columnar=True, blocksize=bs, generator=gen)
    r = fp.rose_layer(W, H, blocksize=bs)
    Wo, pruned, ste = original_rose(W, H, torch.diagonal(H) / 2, 0.5, blocksize=bs)
    assert r.info["reordered"] and ste > 0.5
    assert r.info["relative_range"] == pytest.approx(ste, rel=1e-4)
    check_rose_solve(r, W, H, blocksize=bs, rtol=1e-5)
    assert_weights_agree_where_masks_do(r.weight, Wo, r.mask, ~pruned, 1e-5)


def test_uniform_layer_is_plain_sparsegpt(gen):
    W, H, _ = fp.testing.random_layer(32, 256, generator=gen)
    r = fp.rose_layer(W, H)
    s = fp.sparsegpt_layer(W, H)
    assert not r.info["reordered"] and r.info["relative_range"] < 0.5
    assert torch.equal(r.weight, s.weight) and torch.equal(r.mask, s.mask)


def test_threshold_controls_reordering(gen):
    W, H, _ = fp.testing.random_layer(16, 128, blocksize=32, generator=gen)
    assert fp.rose_layer(W, H, blocksize=32, range_threshold=0.0).info["reordered"]
    assert not fp.rose_layer(W, H, blocksize=32, range_threshold=1.0).info["reordered"]


def test_unpermutation_is_exact(gen):
    """ROSE == SparseGPT run on W[:, perm], H[perm][:, perm], columns put back exactly."""
    W, H, _ = fp.testing.random_layer(24, 128, columnar=True, blocksize=32, generator=gen)
    r = fp.rose_layer(W, H, blocksize=32)
    assert r.info["reordered"]
    from fastprune.ops import torch_column_losses

    bounds = block_bounds(128, 32)
    col, blk = torch_column_losses(wanda_score(W, H), bounds, 0.5)
    perm, sizes = rose_permutation(col, blk, bounds)
    assert sorted(perm.tolist()) == list(range(128)) and sizes == [32] * 4
    s = fp.sparsegpt_layer(W[:, perm], H[perm][:, perm], blocksize=32)
    inv = torch.argsort(perm)
    assert torch.equal(r.weight, s.weight[:, inv])
    assert torch.equal(r.mask, s.mask[:, inv])


def test_permutation_orders_by_descending_losses(gen):
    col = torch.tensor([1.0, 3.0, 2.0, 9.0, 0.0, 5.0])
    blk = torch.tensor([6.0, 14.0])
    perm, sizes = rose_permutation(col, blk, [(0, 3), (3, 6)])
    assert perm.tolist() == [3, 5, 4, 1, 2, 0] and sizes == [3, 3]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_columnar_works_and_keeps_pattern(gen, n, m):
    """The original crashes here; we permute whole groups so the pattern stays valid."""
    W, H, _ = fp.testing.random_layer(20, 64, columnar=True, blocksize=m, generator=gen)
    with pytest.raises(NotImplementedError):
        original_rose(W, H, torch.diagonal(H) / 2, 0.5, n, m)
    r = fp.rose_layer(W, H, prune_n=n, prune_m=m)
    assert r.info["reordered"]
    assert fp.check_nm_keep_mask(r.mask, n, m)
    assert (r.weight[~r.mask] == 0).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_without_reordering_is_sparsegpt(gen, n, m):
    W, H, _ = fp.testing.random_layer(16, 64, generator=gen)
    r = fp.rose_layer(W, H, prune_n=n, prune_m=m, range_threshold=1.0)
    s = fp.sparsegpt_layer(W, H, prune_n=n, prune_m=m)
    assert not r.info["reordered"]
    assert torch.equal(r.weight, s.weight) and torch.equal(r.mask, s.mask)


def test_partial_last_block_reorders(gen):
    """cols not a multiple of the block: the original crashes; we sweep the reordered
    blocks with their own sizes and every ROSE block keeps its pruning budget."""
    W, H, _ = fp.testing.random_layer(16, 100, columnar=True, blocksize=32, generator=gen)
    r = fp.rose_layer(W, H, blocksize=32, range_threshold=0.0)
    assert r.info["reordered"]
    for i1, i2 in block_bounds(100, 32):  # more only where scores tie at the threshold
        assert (~r.mask[:, i1:i2]).sum().item() >= int(16 * (i2 - i1) * 0.5) + 1
    check_rose_solve(r, W, H, blocksize=32)  # each sweep block's `<=` rule, ties included
    D = (W - r.weight).double()
    assert r.loss == pytest.approx(torch.trace(D @ H.double() @ D.t()).item(), rel=1e-5)


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_rose_beats_sparsegpt_on_columnar_layers(gen, n, m):
    """The paper's claim on columnar layers: lower loss on average over a few draws."""
    ratios = []
    for _ in range(3):
        W, H, _ = fp.testing.random_layer(64, 256, columnar=True, generator=gen)
        ratios.append(
            fp.rose_layer(W, H, prune_n=n, prune_m=m).loss
            / fp.sparsegpt_layer(W, H, prune_n=n, prune_m=m).loss
        )
    assert sum(ratios) / len(ratios) < 1.0, ratios


def test_inputs_untouched(gen):
    W, H, _ = fp.testing.random_layer(8, 64, columnar=True, blocksize=16, generator=gen)
    W0, H0 = W.clone(), H.clone()
    fp.rose_layer(W, H, blocksize=16)
    assert torch.equal(W, W0) and torch.equal(H, H0)


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_loss_with_dead_columns_and_reordering(gen, n, m):
    W, H, X = fp.testing.random_layer(16, 96, columnar=True, dead=7, blocksize=32, generator=gen)
    r = fp.rose_layer(W, H, prune_n=n, prune_m=m, blocksize=32, range_threshold=0.0)
    assert r.info["reordered"] and r.info["dead_columns"] == 7
    assert r.loss == pytest.approx(fp.layer_loss(W, r.weight, H), rel=1e-4)


# ------------------------------------------- the range rule with a short last block


def iid_layer(rows, cols, gen):
    """A uniform layer: i.i.d. weights and identically scaled i.i.d. inputs."""
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(4 * cols, cols, generator=gen)
    return W, 2 * X.t() @ X / X.shape[0]


def sum_range(W, H, bs=128):
    """The relative range of the block loss sums (the original rule)."""
    _, blk = torch_column_losses(wanda_score(W, H), block_bounds(W.shape[1], bs), 0.5)
    return relative_range(blk)


@pytest.mark.parametrize("rows,cols", [(576, 576), (1536, 576), (45, 136)])
def test_short_last_block_does_not_make_uniform_layer_columnar(gen, rows, cols):
    """Block sums put a short last block near `1 - width/128` below the others (0.5 for 576
    columns, 0.94 for 136), so the old rule reordered uniform layers by their geometry;
    per column the blocks of a uniform layer are alike."""
    # the per-column range of one draw spreads with 1/sqrt(rows * cols) (45 x 136: mean
    # 0.06, sd 0.04; 576 x 576: mean 0.013, sd 0.005): small layers are judged on the mean
    # of several draws, each one still never reordered (0.5 is many sd away)
    ranges = []
    for _ in range(8 if rows * cols < 10**5 else 1):
        W, H = iid_layer(rows, cols, gen)
        r = fp.rose_layer(W, H, backend="torch")
        old = fp.rose_layer(W, H, backend="torch", range_rule="block_sum")
        assert not r.info["reordered"] and r.info["range_rule"] == "per_column"
        assert old.info["relative_range"] == sum_range(W, H) > 0.45
        if cols == 136:
            assert old.info["reordered"]
        ranges.append(r.info["relative_range"])
    assert sum(ranges) / len(ranges) < 0.15, ranges


FULL_BLOCKS = [(29, 192, 64, 0, 0), (40, 256, 128, 0, 0), (24, 96, 128, 2, 4), (16, 64, 128, 4, 8)]


@pytest.mark.parametrize("rows,cols,bs,n,m", FULL_BLOCKS)
def test_full_block_layers_keep_the_original_range(gen, rows, cols, bs, n, m):
    """Equal widths: the block sums are used as they are, so `relative_range` is bit for bit
    the old rule's (the sums' range) and the result equals the `block_sum` rule's."""
    for columnar in (False, True):
        W, H, _ = fp.testing.random_layer(rows, cols, columnar=columnar, blocksize=m or bs,
                                          generator=gen)  # fmt: skip
        kw = dict(prune_n=n, prune_m=m, blocksize=bs, backend="torch")
        a = fp.rose_layer(W, H, **kw)
        b = fp.rose_layer(W, H, range_rule="block_sum", **kw)
        bounds = block_bounds(cols, m or bs)
        _, blk = torch_column_losses(wanda_score(W, H), bounds, 0.5, n, m)
        assert a.info["relative_range"] == b.info["relative_range"] == relative_range(blk)
        assert a.info["reordered"] == b.info["reordered"] == (relative_range(blk) > 0.5)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("cols,bs", [(100, 32), (576, 128), (136, 128)])
def test_columnar_layer_with_short_last_block_reorders(gen, cols, bs):
    """Per-column losses rank the short block among the others; oracle: that permutation,
    then the original SparseGPT loop sweeping the reordered blocks with their widths."""
    W, H, _ = fp.testing.random_layer(24, cols, columnar=True, blocksize=bs, generator=gen)
    r = fp.rose_layer(W, H, blocksize=bs, backend="torch", inverse_method="reference")
    assert r.info["reordered"] and r.info["relative_range"] > 0.5
    bounds = block_bounds(cols, bs)
    col, blk = torch_column_losses(wanda_score(W, H), bounds, 0.5)
    per_col = blk / torch.tensor([i2 - i1 for i1, i2 in bounds], dtype=blk.dtype)
    assert r.info["relative_range"] == relative_range(per_col)
    blocks = []
    for b in torch.sort(per_col, descending=True, stable=True).indices.tolist():
        i1, i2 = bounds[b]
        blocks.append(i1 + torch.sort(col[i1:i2], descending=True, stable=True).indices)
    perm = torch.cat(blocks)
    Wq, pruned = original_sparsegpt(
        W[:, perm], H[perm][:, perm], 0.5, widths=[len(x) for x in blocks]
    )
    inv = torch.argsort(perm)
    check_rose_solve(r, W, H, blocksize=bs, method="reference", rtol=1e-5)
    assert_weights_agree_where_masks_do(r.weight, Wq[:, inv], r.mask, ~pruned[:, inv], 1e-4)


def test_range_rule_is_checked(gen):
    W, H, _ = fp.testing.random_layer(8, 64, generator=gen)
    with pytest.raises(ValueError, match="range_rule"):
        fp.rose_layer(W, H, range_rule="sum")


# ------------------------------------------- a given mask pruned in ROSE's column order
@pytest.mark.parametrize(
    "rows,cols,n,m", [(1, 96, 0, 0), (13, 128, 0, 0), (7, 64, 2, 4), (9, 96, 4, 8)]
)
def test_own_mask_given_back_reproduces_rose(gen, rows, cols, n, m):
    """ROSE's own mask given as `mask=` takes the same OBS updates in the same order."""
    W, H, _ = fp.testing.random_layer(rows, cols, columnar=True, blocksize=32, generator=gen)
    r = fp.rose_layer(W, H, prune_n=n, prune_m=m, blocksize=32)
    g = fp.rose_layer(W, H, prune_n=n, prune_m=m, blocksize=32, mask=r.mask)
    assert r.info["reordered"] and g.info["reordered"] and g.info["pattern"] == "fixed mask"
    assert torch.equal(g.mask, r.mask)
    assert_close(g.weight, r.weight, rtol=1e-6, atol=1e-6, what="weights")
    assert g.loss == pytest.approx(r.loss, rel=1e-5)


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_given_mask_in_rose_order_is_sparsegpt_on_the_permuted_layer(gen, n, m):
    """Any mask: SparseGPT's fixed-mask updates on W[:, perm], H[perm][:, perm], put back."""
    W, H, _ = fp.testing.random_layer(11, 128, columnar=True, blocksize=32, generator=gen)
    keep = fp.rose_layer(
        fp.testing.random_layer(11, 128, generator=gen)[0], H, prune_n=n, prune_m=m, blocksize=32
    ).mask  # a mask that is not ROSE's own
    g = fp.rose_layer(W, H, prune_n=n, prune_m=m, blocksize=32, mask=keep)
    assert g.info["reordered"] and torch.equal(g.mask, keep)
    col, blk = torch_column_losses(wanda_score(W, H), block_bounds(128, m or 32), 0.5, n, m)
    perm, _ = rose_permutation(col, blk, block_bounds(128, m or 32))
    s = fp.sparsegpt_layer(
        W[:, perm], H[perm][:, perm], prune_n=n, prune_m=m, blocksize=32, mask=keep[:, perm]
    )
    inv = torch.argsort(perm)
    assert_close(g.weight, s.weight[:, inv], rtol=1e-6, atol=1e-6, what="weights")
    assert g.loss == pytest.approx(fp.layer_loss(W, g.weight, H), rel=1e-4)


def test_given_mask_rows_are_the_whole_layers_rows(gen):
    W, H, _ = fp.testing.random_layer(12, 64, columnar=True, blocksize=4, generator=gen)
    keep = fp.rose_layer(W, H, prune_n=2, prune_m=4).mask
    keep[:, :4] = keep[:, :4].flip(1)  # still 2:4, no longer ROSE's
    whole = fp.rose_layer(W, H, prune_n=2, prune_m=4, mask=keep)
    part = fp.rose_layer(W, H, prune_n=2, prune_m=4, mask=keep[3:8], rows=slice(3, 8))
    assert torch.equal(part.mask, whole.mask[3:8])
    assert_close(part.weight, whole.weight[3:8], rtol=1e-6, atol=1e-6, what="weights")


def test_given_mask_is_checked(gen):
    W, H, _ = fp.testing.random_layer(4, 16, generator=gen)
    with pytest.raises(ValueError, match="2:4"):
        fp.rose_layer(W, H, prune_n=2, prune_m=4, mask=torch.ones_like(W, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="mask"):
        fp.rose_layer(W, H, mask=torch.ones(3, 16, dtype=torch.bool))
