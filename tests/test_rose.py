"""ROSE: reordering decision, exact un-permutation, N:M, agreement with the research code."""

import pytest
import torch
from conftest import assert_masks_agree, relative_error

import fastprune as fp
from fastprune.core import wanda_score
from fastprune.obs import block_bounds
from fastprune.original import original_rose
from fastprune.rose import rose_permutation


@pytest.mark.parametrize("rows,cols,bs", [(1, 128, 32), (29, 192, 64), (64, 256, 128)])
def test_columnar_layer_reorders_and_matches_original(gen, rows, cols, bs):
    W, H, _ = fp.testing.random_layer(rows, cols, columnar=True, blocksize=bs, generator=gen)
    r = fp.rose_layer(W, H, blocksize=bs)
    Wo, pruned, ste = original_rose(W, H, torch.diagonal(H) / 2, 0.5, blocksize=bs)
    assert r.info["reordered"] and ste > 0.5
    assert r.info["relative_range"] == pytest.approx(ste, rel=1e-4)
    assert_masks_agree(r.mask, ~pruned, 0.999)
    if torch.equal(r.mask, ~pruned):
        assert relative_error(r.weight, Wo) < 1e-5


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
    for i1, i2 in block_bounds(100, 32):
        assert (~r.mask[:, i1:i2]).sum().item() == int(16 * (i2 - i1) * 0.5) + 1
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
