"""Asymmetric calibration: the cross-term accumulator, the weight correction (the least-squares
fit to the dense outputs) and the pipeline option."""

import pytest
import torch
from pipeline_helpers import calib_ids, tiny_model, tiny_moe_model

import fastprune as fp
from fastprune.hessian import HessianAccumulator, layer_loss
from fastprune.pipeline.asymmetric import CrossAccumulator, asymmetric_target


@pytest.mark.parametrize("cols", [1, 7, 64])
def test_cross_of_equal_pairs_is_H_bit_for_bit(gen, cols):
    batches = [torch.randn(2, 5, cols, generator=gen), torch.randn(9, cols, generator=gen)]
    acc, cross = HessianAccumulator(cols), CrossAccumulator(cols)
    for x in batches:
        acc.add_batch(x)
        cross.add_batch(x, x.clone())
    assert cross.nsamples == acc.nsamples == 3
    assert torch.equal(cross.C, acc.H)


def test_cross_accumulates_2_over_n_xd_t_xp(gen):
    xd = [torch.randn(3, 4, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    xp = [x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in xd]
    cross = CrossAccumulator(6)
    for a, b in zip(xd, xp):
        cross.add_batch(a, b)
    D, P = torch.cat(xd).reshape(-1, 6), torch.cat(xp).reshape(-1, 6)
    want = 2 / 6 * D.t() @ P
    torch.testing.assert_close(cross.C.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        cross.add_batch(torch.randn(2, 3, 6), torch.randn(2, 4, 6))


@pytest.mark.parametrize("rows,cols", [(1, 5), (7, 13), (16, 32)])
def test_target_is_the_least_squares_fit_to_dense_outputs(gen, rows, cols):
    n = 4 * cols
    Xd = torch.randn(n, cols, generator=gen, dtype=torch.float64)
    Xp = Xd + 0.3 * torch.randn(n, cols, generator=gen, dtype=torch.float64)
    W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    H, C = 2 / n * Xp.t() @ Xp, 2 / n * Xd.t() @ Xp
    target, info = asymmetric_target(W, H, C, percdamp=1e-9)
    want = torch.linalg.lstsq(Xp, Xd @ W.t()).solution.t()  # argmin ||Xp V^T - Xd W^T||
    torch.testing.assert_close(target, want, rtol=1e-6, atol=1e-6)
    assert info["asymmetric_correction"] > 0
    # and the split it rests on: ||Xd W^T - Xp V^T||^2 = ||Xp (target - V)^T||^2 + const
    V1, V2 = torch.randn(2, rows, cols, generator=gen, dtype=torch.float64)
    full = [((Xd @ W.t() - Xp @ V.t()) ** 2).sum() for V in (V1, V2)]
    part = [n / 2 * layer_loss(target, V, H) for V in (V1, V2)]
    torch.testing.assert_close(full[0] - full[1], torch.tensor(part[0] - part[1]).double())


def test_target_without_drift_is_W_itself(gen):
    W = torch.randn(5, 8, generator=gen)
    X = torch.randn(20, 8, generator=gen)
    H = X.t() @ X
    target, info = asymmetric_target(W, H, H.clone())
    assert target is W and info["asymmetric_correction"] == 0.0


@pytest.mark.parametrize(
    "method,pattern", [("sparsegpt", (2, 4)), ("rose", (0, 0)), ("wanda", (0, 0))]
)
def test_pipeline_asymmetric(method, pattern):
    n, m = pattern
    calib = calib_ids(4, 16)
    base, asym = tiny_model("llama"), tiny_model("llama")
    plain = fp.prune_model(
        base,
        calib,
        method=method,
        sparsity=0.5,
        prune_n=n,
        prune_m=m,
        progress=False,
        hessian_kind="full",
    )
    rep = fp.prune_model(
        asym,
        calib,
        method=method,
        sparsity=0.5,
        prune_n=n,
        prune_m=m,
        progress=False,
        asymmetric=True,
    )
    assert rep.options["asymmetric"] is True and rep.options["hessian_kind"] == "full"
    first = [lr for lr in rep.layers if lr.name.startswith("0.")]
    later = [lr for lr in rep.layers if not lr.name.startswith("0.")]
    # block 0 sees the same inputs in both models: no correction, the plain result exactly
    assert all(lr.info["asymmetric_correction"] == 0.0 for lr in first)
    assert all(lr.info["asymmetric_correction"] > 0 for lr in later)
    bsd, asd = base.state_dict(), asym.state_dict()
    for k in bsd:
        if ".layers.0." in k:
            assert torch.equal(bsd[k], asd[k]), k
    assert any(not torch.equal(bsd[k], asd[k]) for k in bsd if ".layers.1." in k)
    assert rep.achieved_sparsity == pytest.approx(plain.achieved_sparsity)
    assert rep.totals["asymmetric_seconds"] >= 0


def test_pipeline_asymmetric_fits_the_dense_outputs_better():
    """Each layer of the last block fitted to the dense outputs ends closer to them, on the
    calibration tokens, than the layer fitted to its own outputs on pruned inputs."""
    calib = calib_ids(8, 32)
    dense = tiny_model("llama")
    outs = {}
    for name, asym in (("plain", False), ("asym", True)):
        model = tiny_model("llama")
        fp.prune_model(
            model, calib, method="sparsegpt", sparsity=0.6, progress=False, asymmetric=asym
        )
        outs[name] = model(calib).logits
    with torch.no_grad():
        ref = dense(calib).logits
    err = {k: ((v - ref) ** 2).mean().item() for k, v in outs.items()}
    assert err["asym"] < err["plain"], err


def test_pipeline_asymmetric_refusals():
    calib = calib_ids(2, 16)
    with pytest.raises(TypeError, match="asymmetric must be True or False"):
        fp.prune_model(
            tiny_model("llama"), calib, method="sparsegpt", asymmetric="yes", progress=False
        )
    with pytest.raises(ValueError, match="asymmetric=True needs calibration"):
        fp.prune_model(
            tiny_model("llama"), None, method="magnitude", asymmetric=True, progress=False
        )
    with pytest.raises(ValueError, match="needs the full H"):
        fp.prune_model(
            tiny_model("llama"), calib, method="wanda", asymmetric=True, hessian_kind="diagonal",
            progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="routed experts"):
        fp.prune_model(
            tiny_moe_model("qwen3_moe"), calib, method="sparsegpt", asymmetric=True, progress=False
        )
