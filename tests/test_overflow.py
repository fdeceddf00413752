"""Finite inputs whose products overflow or underflow float32.

Every mask rule is invariant to a positive scale of W and of H, so a layer whose W or H is
huge or tiny is solved on a rescaled copy: each result here must equal the same solve on the
representable problem it is an exact power-of-two multiple of (identical mask, weights and
loss scaled back), with a finite loss and the exact pattern; the inputs stay untouched.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastprune as fp

ROWS, COLS = 12, 64


def _problem():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(ROWS, COLS, generator=g)
    X = torch.randn(COLS, 4 * COLS, generator=g)
    H = X @ X.t() / (2 * COLS)
    return W, H


def _G():
    return torch.rand(ROWS, COLS, generator=torch.Generator().manual_seed(1))


METHODS = {
    "sparsegpt": lambda W, H, n, m, G: fp.sparsegpt_layer(W, H, 0.5, n, m),
    "rose": lambda W, H, n, m, G: fp.rose_layer(W, H, 0.5, n, m),
    "wanda": lambda W, H, n, m, G: fp.wanda_layer(W, H, 0.5, n, m),
    "gblm": lambda W, H, n, m, G: fp.gblm_layer(W, H, 0.5, n, m, G=G),
    "magnitude": lambda W, H, n, m, G: fp.magnitude_layer(W, H, 0.5, n, m),
    "sparseswaps": lambda W, H, n, m, G: fp.sparseswaps_layer(
        W, H, max_swaps=4, sparsity=0.5, prune_n=n, prune_m=m
    ),
}


def _scale_w(e):
    """W times 2^e, the reference W, and how many times W's scale the result is (2^e)."""

    def make(W, H, G):
        return W * 2.0**e, H, G, W, H, G, 2.0**e, 1.0

    return make


def _row_w(W, H, G):
    """One row at ~1e20: the reference is the whole W / 2^50 (row at ~2^16, others ~2^-50)."""
    Wb = W.clone()
    Wb[3] *= 2.0**66
    return Wb, H, G, Wb * 2.0**-50, H, G, 2.0**50, 1.0


def _scale_h(e):
    """H times 2^e (e even); GBLM's G scales by 2^(e/2) so its two terms keep their ratio."""

    def make(W, H, G):
        return W, H * 2.0**e, G * 2.0 ** (e // 2), W, H, G, 1.0, 2.0**e

    return make


CASES = {
    "W~1e30": _scale_w(100),
    "W~1e-30": _scale_w(-100),
    "row~1e20": _row_w,
    "H~1e36": _scale_h(120),
    "H~1e-36": _scale_h(-120),
}


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)], ids=["unstructured", "2:4"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", list(METHODS))
def test_scaled_problem_matches_representable_one(method, case, pattern):
    n, m = pattern
    W, H, G, Wr, Hr, Gr, sw, sh = CASES[case](*_problem(), _G())
    W0, H0, G0 = W.clone(), H.clone(), G.clone()
    r = METHODS[method](W, H, n, m, G)
    ref = METHODS[method](Wr, Hr, n, m, Gr)
    assert torch.equal(W, W0) and torch.equal(H, H0) and torch.equal(G, G0)
    assert torch.isfinite(r.weight).all()
    assert torch.equal(r.mask, ref.mask)
    if n:
        pruned = (~r.mask).reshape(ROWS, COLS // m, m).sum(-1)
        assert (pruned == n).all()
    elif method in ("wanda", "gblm", "magnitude"):
        assert (~r.mask).sum().item() == int(ROWS * COLS * 0.5)
    assert torch.equal(r.weight[~r.mask], torch.zeros_like(r.weight[~r.mask]))
    assert _rel(r.weight.double() / sw, ref.weight) <= 1e-5
    assert r.loss is not None and math.isfinite(r.loss) and r.loss >= 0
    assert r.loss == pytest.approx(ref.loss * sw * sw * sh, rel=1e-4)
    if "loss_after" in r.info:
        assert r.info["loss_after"] == pytest.approx(
            ref.info["loss_after"] * sw * sw * sh, rel=1e-4
        )


@pytest.mark.parametrize("method", ["sparsegpt", "rose", "wanda", "sparseswaps"])
def test_float32_max_scale_weight(method):
    """W near float32's largest values: solved rescaled, weights come back finite."""
    W, H = _problem()
    W = W / W.abs().max() * 3e38
    r = METHODS[method](W, H, 0, 0, _G())
    assert torch.isfinite(r.weight).all() and math.isfinite(r.loss) and r.loss > 0
    assert r.sparsity >= 0.5


def test_literal_scales_no_nan():
    """Scales that are not powers of two: W * 1e30 and H * 1e36."""
    W, H = _problem()
    for Wx, Hx in ((W * 1e30, H), (W * 1e-30, H), (W, H * 1e36), (W * 1e30, H * 1e36)):
        for name in ("sparsegpt", "rose"):
            r = METHODS[name](Wx, Hx, 0, 0, _G())
            assert math.isfinite(r.loss) and r.loss > 0
            assert 0.5 <= r.sparsity < 0.6


def test_inplace_rescaled():
    W, H = _problem()
    Wb = W * 2.0**100
    ref = fp.sparsegpt_layer(Wb, H)
    Wi = Wb.clone()
    r = fp.sparsegpt_layer(Wi, H, inplace=True)
    assert r.weight is Wi and torch.equal(Wi, ref.weight)


def test_shared_inverse_with_huge_h():
    """An inverse of a huge H passed as hinv= gives the same result as computing it inside."""
    W, H = _problem()
    Hb = H * 2.0**120
    inv = fp.inverse_hessian(Hb)
    r = fp.sparsegpt_layer(W, Hb, hinv=inv)
    ref = fp.sparsegpt_layer(W, Hb)
    assert torch.equal(r.mask, ref.mask) and torch.equal(r.weight, ref.weight)
    assert r.loss == ref.loss


@pytest.mark.parametrize("e", [120, -120])
def test_inverse_hessian_huge_or_tiny_psd(e):
    """A PSD H at ~1e36 or ~1e-36 factors: U(2^e H) = U(H) / 2^(e/2), damping scales too."""
    _, H = _problem()
    inv = fp.inverse_hessian(H * 2.0**e)
    ref = fp.inverse_hessian(H)
    assert torch.isfinite(inv.hinv).all()
    assert _rel(inv.hinv.double() * 2.0 ** (e // 2), ref.hinv) <= 1e-6
    assert inv.damp == pytest.approx(ref.damp * 2.0**e, rel=1e-12)
    assert inv.retries == ref.retries


def test_inverse_hessian_literal_1e36():
    _, H = _problem()
    inv = fp.inverse_hessian(H * 1e36)
    assert torch.isfinite(inv.hinv).all() and inv.retries == 0


def test_accumulator_refuses_overflowing_activations():
    acc = fp.HessianAccumulator(COLS)
    acc.add_batch(torch.randn(2, 8, COLS))
    H0 = acc.H.clone()
    with pytest.raises(ValueError, match=r"inp.*float64"):
        acc.add_batch(torch.full((1, 8, COLS), 1e20))
    assert torch.equal(acc.H, H0) and acc.nsamples == 2  # untouched


def test_accumulator_float64_takes_them():
    acc = fp.HessianAccumulator(COLS, dtype=torch.float64)
    acc.add_batch(torch.full((1, 8, COLS), 1e20))
    assert torch.isfinite(acc.H).all()
    assert acc.H[0, 0].item() == pytest.approx(2 * 8 * 1e40, rel=1e-6)


def test_accumulator_fast_path_large_bfloat16():
    """bfloat16 activations whose raw Gram overflows float32 but whose H does not."""
    x = torch.full((16, 1, COLS), 2.0**62, dtype=torch.bfloat16)  # raw x x^T: 2^128
    acc = fp.HessianAccumulator(COLS, precision="fast")
    acc.add_batch(x)  # 16 samples: H = 2/16 * 2^128 = 2^125
    assert torch.isfinite(acc.H).all()
    assert acc.H[0, 0].item() == pytest.approx(2.0**125, rel=1e-6)


def test_accumulator_ordinary_unchanged():
    """The guard does not change the arithmetic of ordinary batches."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 8, COLS, generator=g) for _ in range(3)]
    acc = fp.HessianAccumulator(COLS)
    H = torch.zeros(COLS, COLS)
    ns = 0
    for x in xs:
        acc.add_batch(x)
        H *= ns / (ns + 2)
        ns += 2
        xx = math.sqrt(2 / ns) * x.reshape(-1, COLS).t().float()
        H += xx @ xx.t()
    assert torch.equal(acc.H, H)


def test_weight_that_overflows_when_scaled_back_is_refused():
    """OBS updates move pruned weight onto correlated columns: at ~3e38 that leaves float32."""
    H = torch.full((4, 4), 0.999) + 0.001 * torch.eye(4)
    W = torch.full((2, 4), 3e38)
    with pytest.raises(ValueError, match=r"W: the pruned weight overflows"):
        fp.sparsegpt_layer(W, H, 0.5, percdamp=0.0)
