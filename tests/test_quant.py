"""The quantization grid (fastprune.quant) against a float64 restatement of GPTQ's Quantizer."""

from __future__ import annotations

import pytest
import torch

from fastprune.quant import (
    QuantizedWeight,
    QuantSpec,
    as_spec,
    codes,
    find_grids,
    find_params,
    has_fp8,
    packed,
    quantize,
    round_to_nearest,
)
from fastprune.result import PruneResult

BITS = (2, 3, 4, 8)
needs_fp8 = pytest.mark.skipif(not has_fp8(), reason="torch without float8_e4m3fn")


def gptq_find_params(x: torch.Tensor, maxq: int, sym: bool):
    """IST-DASLab GPTQ `Quantizer.find_params(x, weight=True)` per row, written out row by
    row in float64 Python arithmetic."""
    scales, zeros = [], []
    for row in x.double().tolist():
        xmin = min(min(row), 0.0)
        xmax = max(max(row), 0.0)
        if sym:
            xmax = max(abs(xmin), xmax)
            if xmin < 0:
                xmin = -xmax
        if xmin == 0 and xmax == 0:
            xmin, xmax = -1.0, 1.0
        scale = (xmax - xmin) / maxq
        zero = (maxq + 1) / 2 if sym else float(torch.tensor(-xmin / scale).round())
        scales.append(scale)
        zeros.append(zero)
    return torch.tensor(scales, dtype=torch.float64), torch.tensor(zeros, dtype=torch.float64)


def gptq_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def awkward_rows(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    W[0] = 0  # all-zero row
    W[1] = W[1].abs()  # all non-negative
    W[2] = -W[2].abs()  # all non-positive
    W[3, :] = 0.25  # constant row
    W[4, ::2] = 0  # half pruned
    W[5] *= 1e-6  # tiny
    return W


@pytest.mark.parametrize("bits", (2, 3, 4, 5, 8))
@pytest.mark.parametrize("sym", (True, False))
def test_find_params_matches_gptq_quantizer(bits, sym):
    gen = torch.Generator().manual_seed(bits * 2 + sym)
    W = awkward_rows(gen, 9, 37)
    spec = QuantSpec(bits=bits, sym=sym)
    scale, zero = find_params(W, spec)
    ref_s, ref_z = gptq_find_params(W, spec.maxq, sym)
    assert torch.equal(zero, ref_z)
    assert torch.allclose(scale, ref_s, rtol=1e-15, atol=0)
    Q = quantize(W, scale, zero, spec)
    ref = gptq_quantize(W, ref_s[:, None], ref_z[:, None], spec.maxq)
    assert torch.allclose(Q, ref, rtol=1e-12, atol=1e-300)
    # float32 arithmetic like the weights
    s32, z32 = find_params(W.float(), spec)
    assert s32.dtype == torch.float32
    assert torch.allclose(s32.double(), ref_s, rtol=1e-6)
    assert torch.equal(z32.double(), ref_z) or not sym  # asym: a near-tie may round apart
    assert (z32.double() - ref_z).abs().max() <= 1


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", (True, False))
def test_codes_range_dequantize_and_pruned_zeros(bits, sym):
    gen = torch.Generator().manual_seed(10 + bits)
    W = awkward_rows(gen, 8, 64).float()
    W[:, 5:9] = 0  # pruned
    spec = QuantSpec(bits=bits, sym=sym, group_size=16)
    scale, zero = find_grids(W, spec)
    assert scale.shape == zero.shape == (8, 4)
    g = torch.arange(64) // 16
    Q = quantize(W, scale[:, g], zero[:, g], spec)
    c = codes(W, scale[:, g], zero[:, g], spec)
    assert c.min() >= 0 and c.max() <= spec.maxq
    assert torch.equal(c, torch.round(c))
    assert (Q[W == 0] == 0).all()  # a pruned weight rounds to exactly 0
    qw = packed(spec, Q, scale, zero)
    assert qw.codes.dtype == torch.uint8 and qw.zero.dtype == torch.int32
    assert torch.equal(qw.codes.float(), c)
    assert torch.equal(qw.dequantize(), Q)  # dequantize(codes) == quantize
    # each level of the grid is reachable and levels are `scale` apart
    levels = (Q / scale[:, g]).double()
    assert torch.allclose(levels, levels.round(), atol=1e-4) or not sym


def test_round_to_nearest_groups_and_last_partial_group():
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(6, 50, generator=gen)
    spec = QuantSpec(bits=4, group_size=16, sym=False)
    qw = round_to_nearest(W, spec)
    assert qw.scale.shape == (6, 4)  # 16 + 16 + 16 + 2 columns
    for k, (j1, j2) in enumerate(((0, 16), (16, 32), (32, 48), (48, 50))):
        s, z = gptq_find_params(W[:, j1:j2], spec.maxq, False)
        assert torch.allclose(qw.scale[:, k].double(), s, rtol=1e-6)
        ref = gptq_quantize(W[:, j1:j2].double(), s[:, None], z[:, None], spec.maxq)
        assert torch.allclose(qw.dequantize()[:, j1:j2].double(), ref, atol=1e-6)
    per_channel = round_to_nearest(W, QuantSpec(bits=8, group_size=None))
    assert per_channel.scale.shape == (6, 1)
    assert (per_channel.dequantize() - W).abs().max() <= per_channel.scale.max() / 2 + 1e-7
    assert isinstance(round_to_nearest(W, "w4a16"), QuantizedWeight)


def test_nbytes():
    W = torch.randn(4, 256)
    q4 = round_to_nearest(W, QuantSpec(bits=4, group_size=128))
    assert q4.nbytes() == 4 * 256 // 2 + 4 * 2 * 4  # 2 codes a byte + float32 scales
    q8 = round_to_nearest(W, QuantSpec(bits=8, group_size=None, sym=False))
    assert q8.nbytes() == 4 * 256 + 4 * 4 + 4  # zero points of 4 rows packed in one word
    assert q4.nbytes() < q8.nbytes() < W.numel() * 4


def test_presets():
    assert QuantSpec.preset("w4a16") == QuantSpec(bits=4, group_size=128, sym=True)
    assert QuantSpec.preset("w8a16") == QuantSpec(bits=8, group_size=None, sym=True)
    assert QuantSpec(bits=3).maxq == 7
    assert as_spec("w8a16").bits == 8 and as_spec(None) is None
    with pytest.raises(ValueError, match="preset"):
        QuantSpec.preset("w3a8")
    with pytest.raises(TypeError, match="quant"):
        as_spec(4)


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(bits=1), ValueError, "bits"),
        (dict(bits=9), ValueError, "bits"),
        (dict(bits=4.0), TypeError, "bits"),
        (dict(bits=True), TypeError, "bits"),
        (dict(group_size=0), ValueError, "group_size"),
        (dict(group_size=-128), ValueError, "group_size"),
        (dict(group_size=12.5), TypeError, "group_size"),
        (dict(sym=1), TypeError, "sym"),
        (dict(actorder="yes"), TypeError, "actorder"),
        (dict(format="nf4"), ValueError, "format"),
        (dict(params="mse"), ValueError, "params"),
    ],
)
def test_bad_arguments_are_named(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        QuantSpec(**kwargs)


def test_fp8_needs_torch_float8(monkeypatch):
    import fastprune.quant as q

    monkeypatch.setattr(q, "has_fp8", lambda: False)
    with pytest.raises(ValueError, match="format"):
        QuantSpec(format="fp8", group_size=None)


@needs_fp8
def test_fp8_grid():
    spec = QuantSpec.preset("fp8")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(format="fp8", group_size=128)
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(5, 40, generator=gen)
    W[0] = 0
    W[1, :7] = 0
    scale, zero = find_params(W, spec)
    assert scale[0] == 1 and (zero == 0).all()
    assert torch.allclose(scale[1:], W[1:].abs().amax(1) / 448)
    Q = quantize(W, scale, zero, spec)
    ref = (W / scale[:, None]).to(torch.float8_e4m3fn).float() * scale[:, None]
    assert torch.equal(Q, ref)
    assert (Q[W == 0] == 0).all()
    assert torch.allclose(Q.abs().amax(1), W.abs().amax(1), rtol=1e-6)  # the max is on the grid
    qw = packed(spec, Q, scale[:, None], zero[:, None])
    assert qw.codes.dtype == torch.float8_e4m3fn and qw.zero is None
    assert torch.equal(qw.dequantize(), Q)
    assert qw.nbytes() == 5 * 40 + 5 * 4
    # updated weights beyond the grid's range saturate at +-448 instead of NaN
    assert torch.isfinite(quantize(W * 2, scale, zero, spec)).all()


def test_prune_result_quant_field():
    W = torch.randn(3, 8)
    r = PruneResult(W, torch.ones(3, 8, dtype=torch.bool), 0.0, {"method": "x"})
    assert r.quant is None
    qw = round_to_nearest(W, QuantSpec(bits=4, group_size=None))
    info = {"method": "gptq", "quant": {**qw.spec.as_info(), "grid_error": 0.01}}
    r = PruneResult(qw.dequantize(), torch.ones(3, 8, dtype=torch.bool), 0.0, info, qw)
    assert r.quant is qw and "quant=int4" in r.summary()
