"""diag(H) alone: the accumulator (Wanda's statistic), the selectors that take it in place of
H, the row-chunked selection, and the pipeline's `hessian_kind`."""

import pytest
import torch
from conftest import MASK_AGREE, assert_masks_agree
from pipeline_helpers import tiny_model

import fastprune as fp
from fastprune.hessian import HessianAccumulator
from fastprune.original import original_wanda
from fastprune.solvers import selection
from fastprune.testing import random_layer

PATTERNS = [(0, 0), (2, 4), (4, 8)]


def wanda_scaler(batches, cols):
    """Wanda's `WrappedGPT.add_batch` statistic, written out as its code does it."""
    scaler, n = torch.zeros(cols), 0
    for inp in batches:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        scaler *= n / (n + tmp)
        n += tmp
        inp = inp.type(torch.float32)
        scaler += torch.norm(inp, p=2, dim=1) ** 2 / n
    return scaler, n


@pytest.mark.parametrize("cols", [1, 13, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulator_is_wandas_statistic(gen, cols, dtype):
    batches = [
        torch.randn(3, 7, cols, generator=gen).to(dtype),
        torch.randn(5, cols, generator=gen).to(dtype),  # 2-D: one sample
        torch.randn(0, 4, cols).to(dtype),  # no tokens: nothing added, nothing counted
        torch.randn(2, 1, cols, generator=gen).to(dtype) * 30,
    ]
    acc = fp.DiagonalAccumulator(cols)
    for x in batches:
        acc.add_batch(x)
    want, n = wanda_scaler([b for b in batches if b.numel()], cols)
    assert acc.nsamples == n == 6
    assert torch.equal(acc.scaler_row, want)
    assert torch.equal(acc.H, 2 * want)  # diag(H) = 2 * scaler, exactly
    full = HessianAccumulator(cols)
    for x in batches:
        full.add_batch(x)
    assert torch.allclose(acc.H, torch.diagonal(full.H), rtol=1e-5, atol=0)


def test_accumulator_refuses_bad_batches():
    acc = fp.DiagonalAccumulator(8)
    with pytest.raises(ValueError, match=r"inp must be \[batch, tokens, 8\]"):
        acc.add_batch(torch.randn(2, 3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        acc.add_batch(torch.ones(2, 8, dtype=torch.int64))
    bad = torch.randn(2, 3, 8)
    bad[1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        acc.add_batch(bad)
    with pytest.raises(ValueError, match="overflow float32"):
        acc.add_batch(torch.full((1, 4, 8), 3e19))
    assert acc.nsamples == 0 and not acc.scaler_row.any()  # refused before any change
    with pytest.raises(ValueError, match="cols"):
        fp.DiagonalAccumulator(0)


@pytest.mark.parametrize("rows,cols", [(1, 16), (37, 104), (64, 256)])
@pytest.mark.parametrize("n,m", PATTERNS)
def test_selectors_take_the_diagonal(gen, rows, cols, n, m):
    W, H, _ = random_layer(rows, cols, generator=gen)
    d = torch.diagonal(H).clone()
    G = torch.rand(rows, cols, generator=gen)
    for full, diag in [
        (fp.wanda_layer(W, H, 0.5, n, m), fp.wanda_layer(W, d, 0.5, n, m)),
        (fp.gblm_layer(W, H, 0.5, n, m, G=G), fp.gblm_layer(W, d, 0.5, n, m, G=G)),
        (fp.magnitude_layer(W, H, 0.5, n, m), fp.magnitude_layer(W, d, 0.5, n, m)),
    ]:
        assert torch.equal(full.mask, diag.mask) and torch.equal(full.weight, diag.weight)
        assert full.loss is not None and diag.loss is None
        assert diag.info["hessian"] == "diagonal (no layer loss)"
    Wo, pruned = original_wanda(W, d / 2, 0.5, n, m)
    assert torch.equal(fp.wanda_layer(W, d, 0.5, n, m).mask, ~pruned)


def test_diagonal_rescaled_like_the_full_h(gen):
    """A layer outside the solve's range is rescaled by its diagonal as by its H."""
    W, H, _ = random_layer(16, 64, generator=gen)
    H = H * 2.0**60
    full, diag = fp.wanda_layer(W, H, 0.5), fp.wanda_layer(W, torch.diagonal(H).clone(), 0.5)
    assert full.info["rescaled"] == diag.info["rescaled"]
    assert torch.equal(full.mask, diag.mask)


def test_bad_diagonals_are_named(gen):
    W, H, _ = random_layer(8, 32, generator=gen)
    d = torch.diagonal(H).clone()
    with pytest.raises(ValueError, match="W's 32 columns"):
        fp.wanda_layer(W, d[:31])
    neg = d.clone()
    neg[4] = -1.0
    with pytest.raises(ValueError, match="non-negative.*at 4"):
        fp.wanda_layer(W, neg)
    nan = d.clone()
    nan[0] = float("nan")
    with pytest.raises(ValueError, match="H contains 1 NaN"):
        fp.gblm_layer(W, nan, G=torch.ones_like(W))
    with pytest.raises(TypeError, match="floating-point"):
        fp.wanda_layer(W, torch.ones(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="square"):  # methods that need the full H
        fp.sparsegpt_layer(W, d)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("rows,cols", [(1, 24), (29, 40), (64, 128)])
def test_row_chunks_change_nothing(gen, monkeypatch, rows, cols, n, m):
    W, H, _ = random_layer(rows, cols, generator=gen)
    G = torch.rand(rows, cols, generator=gen)
    solves = {
        "wanda": lambda: fp.wanda_layer(W, H, 0.6, n, m),
        "gblm": lambda: fp.gblm_layer(W, H, 0.6, n, m, G=G),
        "magnitude": lambda: fp.magnitude_layer(W, H, 0.6, n, m),
    }
    whole = {k: f() for k, f in solves.items()}
    monkeypatch.setattr(selection, "ROW_CHUNK_ELEMENTS", 3 * cols - 1)  # 2 rows, then the rest
    for k, f in solves.items():
        r = f()
        assert torch.equal(r.mask, whole[k].mask), k
        assert torch.equal(r.weight, whole[k].weight) and r.loss == whole[k].loss, k


# ------------------------------------------------------------------------------ pipeline


def _calib(model, gen):
    return torch.randint(0, model.config.vocab_size, (4, 16), generator=gen)


@pytest.mark.parametrize("method", ["wanda", "gblm"])
def test_pipeline_kind_auto_is_diagonal(gen, method):
    model = tiny_model("llama")
    calib = _calib(model, gen)
    full = tiny_model("llama")
    auto = fp.prune_model(model, calib, method=method, sparsity=0.5, progress=False)
    kept = fp.prune_model(
        full, calib, method=method, sparsity=0.5, progress=False, hessian_kind="full"
    )
    assert auto.options["hessian_kind"] == "diagonal" and kept.options["hessian_kind"] == "full"
    assert all(lr.loss is None for lr in auto.layers)
    assert all(lr.loss is not None and lr.loss >= 0 for lr in kept.layers)
    for (name, a), b in zip(model.named_parameters(), full.parameters()):
        if a.dim() == 2 and "layers." in name:  # the same masks up to float32 rounding
            assert_masks_agree(a != 0, b != 0, MASK_AGREE, name)


def test_pipeline_kind_checked(gen):
    model = tiny_model("llama")
    calib = _calib(model, gen)
    with pytest.raises(ValueError, match="hessian_kind='diagonal' does not fit 'sparsegpt'"):
        fp.prune_model(model, calib, method="sparsegpt", hessian_kind="diagonal", progress=False)
    with pytest.raises(ValueError, match="hessian_kind must be one of"):
        fp.prune_model(model, calib, method="wanda", hessian_kind="diag", progress=False)
    rep = fp.prune_model(model, calib, method="sparsegpt", sparsity=0.5, progress=False)
    assert rep.options["hessian_kind"] == "full"
