"""Magnitude, Wanda and GBLM selection semantics."""

import pytest
import torch

import fastprune as fp
from fastprune.original import original_wanda

PATTERNS = [(0, 0), (2, 4), (4, 8)]


@pytest.mark.parametrize("rows,cols", [(1, 16), (37, 104), (64, 256)])
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("sparsity", [0.5, 0.6])
def test_wanda_matches_original(gen, rows, cols, n, m, sparsity):
    W, H, _ = fp.testing.random_layer(rows, cols, generator=gen)
    r = fp.wanda_layer(W, H, sparsity, n, m)
    Wo, pruned = original_wanda(W, torch.diagonal(H) / 2, sparsity, n, m)
    assert torch.equal(r.mask, ~pruned)
    assert torch.equal(r.weight, Wo)
    if n:
        assert fp.check_nm_keep_mask(r.mask, n, m)
    else:
        assert ((~r.mask).sum(1) == int(cols * sparsity)).all()


def test_wanda_ties_broken_stably():
    W = torch.ones(2, 8)
    H = torch.eye(8)
    r = fp.wanda_layer(W, H, 0.5)
    assert r.mask[:, :4].logical_not().all() and r.mask[:, 4:].all()


@pytest.mark.parametrize("n,m", PATTERNS)
def test_magnitude(gen, n, m):
    W = torch.randn(24, 64, generator=gen)
    r = fp.magnitude_layer(W, None, 0.5, n, m)
    assert r.loss is None
    if n:
        assert fp.check_nm_keep_mask(r.mask, n, m)
    else:  # one threshold over the whole layer, exactly int(numel * s) pruned
        assert (~r.mask).sum().item() == int(W.numel() * 0.5)
        assert W.abs()[~r.mask].max() <= W.abs()[r.mask].min()
    assert torch.equal(r.weight, W * r.mask)


def test_magnitude_exact_count_with_ties():
    W = torch.tensor([[1.0, 1.0, 1.0, 2.0], [1.0, 3.0, 1.0, 1.0]])
    r = fp.magnitude_layer(W, sparsity=0.5)
    assert (~r.mask).sum().item() == 4


def test_gblm_zero_gradient_is_wanda(gen):
    W, H, _ = fp.testing.random_layer(16, 64, generator=gen)
    a = fp.gblm_layer(W, H, 0.5, G=torch.zeros_like(W))
    b = fp.wanda_layer(W, H, 0.5)
    assert torch.equal(a.mask, b.mask) and a.loss == pytest.approx(b.loss)


@pytest.mark.parametrize("n,m", PATTERNS)
def test_gblm_score(gen, n, m):
    W, H, _ = fp.testing.random_layer(16, 64, generator=gen)
    G = torch.rand(16, 64, generator=gen)
    r = fp.gblm_layer(W, H, 0.5, n, m, G=G, alpha=3.0)
    score = W.abs() * torch.sqrt(torch.diagonal(H) / 2) + 3.0 * W.abs() * G
    _, pruned = original_wanda(score, torch.ones(64) * 1.0, 0.5, n, m)  # selection as Wanda
    assert torch.equal(r.mask, ~pruned)
    assert r.info["alpha"] == 3.0


def test_gradient_norm_accumulators(gen):
    grads = [torch.randn(3, 5, generator=gen) for _ in range(4)]
    l2 = fp.gradient_norm(grads, "l2")
    l1 = fp.gradient_norm(grads, "l1", scale=10.0)
    torch.testing.assert_close(l2, torch.stack([100 * g for g in grads]).pow(2).sum(0).sqrt())
    torch.testing.assert_close(l1, torch.stack([10 * g for g in grads]).abs().sum(0))
    with pytest.raises(ValueError, match="norm"):
        fp.GradientNormAccumulator((2, 2), norm="linf")


@pytest.mark.parametrize("fn", ["wanda", "gblm", "magnitude"])
def test_loss_reported_and_inputs_untouched(gen, fn):
    W, H, X = fp.testing.random_layer(8, 32, generator=gen)
    W0 = W.clone()
    if fn == "wanda":
        r = fp.wanda_layer(W, H)
    elif fn == "gblm":
        r = fp.gblm_layer(W, H, G=torch.rand(8, 32, generator=gen))
    else:
        r = fp.magnitude_layer(W, H=H)
    assert torch.equal(W, W0)
    D = (W - r.weight).double()
    Xf = X.reshape(-1, 32).double()
    assert r.loss == pytest.approx(2 / X.shape[0] * ((D @ Xf.t()) ** 2).sum().item(), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(gen, dtype):
    W, H, _ = fp.testing.random_layer(8, 32, generator=gen)
    r = fp.wanda_layer(W.to(dtype), H, prune_n=2, prune_m=4)
    assert r.weight.dtype == dtype and fp.check_nm_keep_mask(r.mask, 2, 4)


def _stable_sort_rows(score, sparsity):
    """The first `int(cols * sparsity)` of each row's stable sort (Wanda's own rule)."""
    k = int(score.shape[1] * sparsity)
    pruned = torch.zeros_like(score, dtype=torch.bool)
    if k:
        pruned.scatter_(1, torch.sort(score, dim=-1, stable=True).indices[:, :k], True)
    return pruned


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 17), (7, 2), (31, 97), (64, 256)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("levels", [2, 5, None])  # heavy ties, some, none
def test_row_selection_is_the_stable_sort(gen, rows, cols, sparsity, levels):
    from fastprune.masks import row_prune_mask

    if levels is None:
        score = torch.rand(rows, cols, generator=gen)
    else:
        score = torch.randint(0, levels, (rows, cols), generator=gen).float()
        score[0, : cols // 2] = 0.0  # a row with a long run of equal lowest scores
    got, want = row_prune_mask(score, sparsity), _stable_sort_rows(score, sparsity)
    bad = (got != want).nonzero()
    assert not bad.numel(), f"{bad.shape[0]} differ, first at {bad[:3].tolist()}"
    assert (got.sum(1) == int(cols * sparsity)).all()
