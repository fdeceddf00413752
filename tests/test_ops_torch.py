"""The torch reference ops themselves, and backend dispatch."""

import pytest
import torch
from conftest import assert_close

import fastprune as fp
from fastprune import ops
from fastprune.masks import threshold_prune_mask
from fastprune.ops import torch_column_losses, torch_obs_sweep


def literal_sweep(W1, Hinv1, prune1, n, m):
    """Column by column, one rank-1 update over the rest of the block (the research loop)."""
    W1 = W1.clone()
    rows, count = W1.shape
    Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
    prune1 = torch.zeros_like(W1, dtype=torch.bool) if n else prune1.clone()
    d = Hinv1.diagonal()
    for i in range(count):
        if n and i % m == 0:
            tmp = W1[:, i : i + m] ** 2 / d[i : i + m] ** 2
            prune1.scatter_(1, i + torch.topk(tmp, n, dim=1, largest=False)[1], True)
        w = W1[:, i]
        q = torch.where(prune1[:, i], torch.zeros_like(w), w)
        err = (w - q) / d[i]
        Q1[:, i], E1[:, i] = q, err
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
    return Q1, E1, prune1, (E1**2).sum(1) / 2


@pytest.mark.parametrize("rows,count", [(1, 32), (37, 48), (16, 104)])
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4), (4, 8)])
def test_blocked_sweep_equals_literal_sweep(gen, rows, count, n, m):
    if m and count % m:
        pytest.skip("count not divisible by M")
    W, H, _ = fp.testing.random_layer(rows, count, generator=gen, dtype=torch.float64)
    hinv = fp.inverse_hessian(H.double()).hinv
    prune1 = None if n else threshold_prune_mask(W**2 / hinv.diagonal() ** 2, 0.5)
    got = torch_obs_sweep(W, hinv, None if prune1 is None else ~prune1, n, m)  # keep-masks
    want = literal_sweep(W, hinv, prune1, n, m)
    assert torch.equal(got[2], ~want[2])
    for a, b, name in zip(got[:2] + got[3:], want[:2] + want[3:], ["Q1", "Err1", "loss"]):
        assert_close(a, b, rtol=1e-10, atol=1e-12, what=name)


def test_column_losses_match_per_block_sorts(gen):
    S = torch.rand(12, 70, generator=gen)
    bounds = [(0, 32), (32, 64), (64, 70)]
    col, blk = torch_column_losses(S, bounds, 0.5)
    for b, (i1, i2) in enumerate(bounds):
        tmp = S[:, i1:i2]
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * 0.5)]
        L = tmp * (tmp <= thresh)
        assert_close(col[i1:i2], L.sum(0), rtol=1e-6, what="column loss")
        assert blk[b].item() == pytest.approx(L.sum().item(), rel=1e-6)
    col, blk = torch_column_losses(S[:, :68], [], 0.5, 2, 4)
    assert blk.shape == (17,)
    assert_close(blk, col.reshape(17, 4).sum(1), rtol=1e-6, what="group loss")


def test_dispatch(monkeypatch):
    dev = torch.device("cpu")
    assert ops.resolve_backend("auto", dev, ("obs_sweep",)) == "torch"
    assert ops.resolve_backend("torch", dev, ("obs_sweep",)) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ops.BackendUnavailableError, match="triton"):
        ops.resolve_backend("triton", dev, ("obs_sweep",))
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.resolve_backend("cuda", dev, ("obs_sweep",))
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("tpu", dev, ("obs_sweep",))
    with pytest.raises(ValueError, match="no_such_op"):
        ops.resolve_backend("torch", dev, ("no_such_op",))
