"""The drop-in adapters against (a) fastprune's own layer functions and (b) small faithful
restatements of the original classes (IST-DASLab SparseGPT, ROSE, Wanda's WrappedGPT,
llm-compressor's sparsify_weight) run on the same inputs.

Agreement with the original loops: masks equal on >= 99.9% of entries (a flip can only come
from two scores within float32 rounding, since the fused sweep rounds differently from the
per-column loop) and weights within 1e-4 relative overall; against fastprune's own functions
on the same Hessian the results are identical.
"""

from __future__ import annotations

import copy
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_masks_agree, relative_error
from torch import nn

import fastprune as fp
from fastprune import compat
from fastprune.original import (
    _rose_block_losses,
    original_find_params,
    original_rose,
    original_sparsegpt,
    original_wanda,
)
from fastprune.testing import random_layer

MASK_AGREE = 0.999
WEIGHT_RTOL = 1e-4


# ------------------------------------------------------------- faithful class restatements


def ref_weight(layer):
    W = layer.weight.data.clone()
    if isinstance(layer, nn.Conv2d):
        W = W.flatten(1)
    if type(layer).__name__ == "Conv1D":
        W = W.t()
    return W


def ref_inputs(layer, inp):
    """The reference wrappers' input handling (Conv2d unfolded as GPTQ/llm-compressor)."""
    if len(inp.shape) == 2:
        inp = inp.unsqueeze(0)
    tmp = inp.shape[0]
    if isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D":
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
    if isinstance(layer, nn.Conv2d):
        unfold = nn.Unfold(
            layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
        )
        inp = unfold(inp).permute([1, 0, 2]).flatten(1)
    return inp, tmp


def ref_write(layer, W):
    if type(layer).__name__ == "Conv1D":
        W = W.t()
    layer.weight.data = W.reshape(layer.weight.shape).to(layer.weight.data.dtype)


class RefSparseGPT:
    """IST-DASLab `SparseGPT` class behaviour; the loop is `fastprune.original`'s."""

    def __init__(self, layer):
        self.layer = layer
        W = ref_weight(layer)
        self.rows, self.columns = W.shape
        self.H = torch.zeros((self.columns, self.columns))
        self.nsamples = 0

    def add_batch(self, inp, out):
        inp, tmp = ref_inputs(self.layer, inp)
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
        W = ref_weight(self.layer).float()
        H = self.H
        del self.H
        W, _ = original_sparsegpt(W, H, sparsity, prunen, prunem, blocksize, percdamp)
        ref_write(self.layer, W)


class RefQuantizer(nn.Module):
    """The IST-DASLab `Quantizer`'s state as `fasterprune` reads it (`configure`, `ready`)."""

    def __init__(self, shape=1):
        super().__init__()
        self.register_buffer("maxq", torch.tensor(0))
        self.register_buffer("scale", torch.zeros(shape))
        self.register_buffer("zero", torch.zeros(shape))

    def configure(self, bits, perchannel=False, sym=True, mse=False, norm=2.4, grid=100,
                  maxshrink=0.8, grouprows=1):  # fmt: skip
        self.maxq = torch.tensor(2**bits - 1)
        self.perchannel, self.sym, self.mse = perchannel, sym, mse
        self.norm, self.grid, self.maxshrink, self.grouprows = norm, grid, maxshrink, grouprows

    def ready(self):
        return torch.all(self.scale != 0)


def original_sparsegpt_wbits(W, H, sparsity, n, m, blocksize, bits, sym, monkeypatch):
    """`original_sparsegpt(wbits=bits)`, SparseGPT's `--wbits` loop, with the quantizer's
    `sym` setting (the original script configures sym=False; its Quantizer takes either)."""
    import fastprune.original as original

    real = original.original_find_params
    with monkeypatch.context() as mp:
        mp.setattr(original, "original_find_params", lambda x, b, **_: real(x, b, sym))
        return original.original_sparsegpt(W, H, sparsity, n, m, blocksize, wbits=bits)


class RefROSE:
    """ROSE repository class behaviour: its add_batch (scaler_row) and `original_rose`."""

    def __init__(self, layer):
        self.layer = layer
        W = ref_weight(layer)
        self.rows, self.columns = W.shape
        self.H = torch.zeros((self.columns, self.columns))
        self.scaler_row = torch.zeros(self.columns)
        self.nsamples = 0

    def add_batch(self, inp, out):
        inp, tmp = ref_inputs(self.layer, inp)
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.H *= self.nsamples / (self.nsamples + tmp)
        inp = inp.type(torch.float32)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
        W = ref_weight(self.layer).float()
        Wq, _, ste = original_rose(
            W, self.H.clone(), self.scaler_row, sparsity, prune_n, prune_m, blocksize, percdamp
        )
        ref_write(self.layer, Wq)
        return ste


class RefWrappedGPT:
    """Wanda's `WrappedGPT` (nn.Linear)."""

    def __init__(self, layer):
        self.layer = layer
        self.columns = layer.weight.shape[1]
        self.scaler_row = torch.zeros(self.columns)
        self.nsamples = 0

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def ref_sparsify_weight(
    W, H, sparsity, prune_n, prune_m, block_size, damp_frac, preserve, fixed_index=False
):
    """llm-compressor's `sparsify_weight` loop on a `[rows, cols]` float32 weight.

    With preserve and N:M, llm-compressor reads the preserved mask of a group at the
    block-relative column `i` instead of `i1 + i` (wrong for every block after the first);
    `fixed_index=True` reads the group's own columns, as fastprune does.
    """
    W = W.clone().float()
    H = H.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = damp_frac * torch.mean(torch.diag(H))
    idx = torch.arange(cols)
    H[idx, idx] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = None
    if preserve:
        mask = W == 0
        if mask.sum() / W.numel() > sparsity:
            raise ValueError("already sparser")
    losses = torch.zeros(rows)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune_n == 0:
            if mask is not None:
                mask1 = mask[:, i1:i2]
                if int(W1.numel() * sparsity) > mask1.sum():
                    tmp = (~mask[:, i1:i2]) * W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                    mask1 = tmp <= thresh
            else:
                tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
        else:
            mask1 = mask[:, i1:i2] if mask is not None else torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = W1[:, i : i + prune_m] ** 2 / torch.diag(Hinv1)[i : i + prune_m] ** 2
                if mask is not None:
                    j = i1 + i if fixed_index else i
                    tmp = tmp * (~mask[:, j : j + prune_m])
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        losses += torch.sum(Losses1, 1) / 2
        if preserve:
            W[:, i2:] -= (~mask[:, i2:]) * Err1.matmul(Hinv[i1:i2, i2:])
        else:
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return torch.sum(losses).item(), W


# ------------------------------------------------------------------------------- helpers


def linear_with_inputs(gen, rows, cols, columnar=False, blocksize=128, dtype=torch.float32):
    W, _, X = random_layer(rows, cols, nsamples=5, tokens=24, columnar=columnar,
                           blocksize=blocksize, generator=gen)  # fmt: skip
    layer = nn.Linear(cols, rows, bias=False)
    layer.weight.data = W.to(dtype)
    # uneven batches, one 2-D: the running weights n/(n+b) matter
    return layer, [X[:2].to(dtype), X[2].to(dtype), X[3:].to(dtype)]


def feed(wrappers, batches):
    for x in batches:
        for w in wrappers:
            w.add_batch(x, None)


def pruned_of(layer):
    return ref_weight(layer) == 0


def assert_same_pruning(a_layer, b_layer, what):
    Wa, Wb = ref_weight(a_layer).float(), ref_weight(b_layer).float()
    assert a_layer.weight.shape == b_layer.weight.shape
    assert a_layer.weight.dtype == b_layer.weight.dtype
    assert_masks_agree(Wa == 0, Wb == 0, MASK_AGREE, what=f"{what} mask")
    assert relative_error(Wa, Wb) < WEIGHT_RTOL, f"{what}: {relative_error(Wa, Wb)}"


def clone_layer(layer):
    return copy.deepcopy(layer)


# ------------------------------------------------------------------------------ SparseGPT


@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)])
def test_sparsegpt_linear_matches_reference_and_library(gen, pattern):
    n, m = pattern
    layer, batches = linear_with_inputs(gen, 24, 200)
    ref_layer = clone_layer(layer)
    W0 = layer.weight.data.clone()
    ad, ref = compat.SparseGPT(layer), RefSparseGPT(ref_layer)
    acc = fp.HessianAccumulator(200)
    feed([ad, ref], batches)
    for x in batches:
        acc.add_batch(x)
    assert (ad.rows, ad.columns, ad.nsamples) == (24, 200, ref.nsamples) == (24, 200, 5)
    assert torch.allclose(ad.H, ref.H, rtol=1e-6, atol=0)
    assert torch.allclose(ad.H, acc.H, rtol=1e-5, atol=1e-7)
    H = ad.H.clone()
    # the Wanda/ROSE copies of the class spell the pattern prune_n/prune_m
    r = ad.fasterprune(0.5, prune_n=n, prune_m=m, blocksize=64)
    ref.fasterprune(0.5, prunen=n, prunem=m, blocksize=64)
    assert not hasattr(ad, "H")  # consumed, as the reference does
    ad.free()
    assert ad.H is None
    assert_same_pruning(layer, ref_layer, "SparseGPT vs reference")
    own = fp.sparsegpt_layer(W0, H, 0.5, n, m, blocksize=64, inverse_method="reference")
    assert torch.equal(layer.weight.data, own.weight)
    assert torch.equal(r.mask, own.mask) and r.loss == pytest.approx(own.loss)
    if n:
        assert fp.check_nm_keep_mask(layer.weight.data != 0, n, m)


def test_sparsegpt_half_precision_layer_writes_back_its_dtype(gen):
    layer, batches = linear_with_inputs(gen, 16, 96, dtype=torch.bfloat16)
    ref_layer = clone_layer(layer)
    ad, ref = compat.SparseGPT(layer), RefSparseGPT(ref_layer)
    feed([ad, ref], batches)
    ad.fasterprune(0.6, blocksize=32)
    ref.fasterprune(0.6, blocksize=32)
    assert layer.weight.dtype == torch.bfloat16
    assert_masks_agree(pruned_of(layer), pruned_of(ref_layer), MASK_AGREE)
    # weights may differ by one bf16 ulp where the float32 results straddle a rounding edge
    assert relative_error(layer.weight.data.float(), ref_layer.weight.data.float()) < 1e-2


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("pattern", [(0.5, 0, 0), (0.5, 2, 4)], ids=["unstructured", "2:4"])
def test_sparsegpt_quantizer_matches_wbits_reference(gen, monkeypatch, pattern, sym):
    """A quantizer attached as SparseGPT's `--wbits` does (4 bits, per channel): the same
    mask and quantized weights as the original loop, up to counted float near-ties, the
    grid left on the quantizer as `find_params` leaves it, codes in `result.quant`."""
    sparsity, n, m = pattern
    layer, batches = linear_with_inputs(gen, 32, 192)
    W0 = layer.weight.data.clone()
    ad = compat.SparseGPT(layer)
    ad.quantizer = RefQuantizer()
    ad.quantizer.configure(4, perchannel=True, sym=sym, mse=False)
    feed([ad], batches)
    H = ad.H.clone()
    r = ad.fasterprune(sparsity, n, m, blocksize=64)
    ref_W, pruned = original_sparsegpt_wbits(W0, H, sparsity, n, m, 64, 4, sym, monkeypatch)
    Wq = layer.weight.data
    assert_masks_agree(~r.mask, pruned, MASK_AGREE, what="joint mask")
    assert torch.equal(Wq == 0, ~r.mask | (Wq == 0))  # pruned weights are exactly 0
    scale, zero = original_find_params(W0, 4, sym)
    assert torch.equal(ad.quantizer.scale, scale) and torch.equal(ad.quantizer.zero, zero)
    # every weight on its row's grid; the references' codes equal except near-ties
    codes, ref_codes = torch.round(Wq / scale) + zero, torch.round(ref_W / scale) + zero
    assert torch.allclose(scale * (codes - zero), Wq, rtol=0, atol=1e-6)
    assert torch.equal(r.quant.codes.float(), codes)
    differ = (codes != ref_codes).sum().item()
    assert differ <= 1e-3 * codes.numel(), f"{differ} codes differ"
    assert relative_error(Wq, ref_W) < 1e-2
    assert r.info["quant"]["params"] == "static" and r.quant.spec.sym == sym
    if n:
        assert fp.check_nm_keep_mask(r.mask, n, m)
    own = fp.sparsegpt_layer(W0, H, sparsity, n, m, blocksize=64, inverse_method="reference",
                             quant=fp.QuantSpec(4, None, sym, params="static"))  # fmt: skip
    assert torch.equal(Wq, own.weight) and torch.equal(r.mask, own.mask)


def test_conv2d_patches_reproduce_the_convolution(gen):
    """The unfolded inputs are what the flattened kernel multiplies, for int, 'same' and
    reflect padding (so H is the Hessian of this layer's outputs)."""
    for kw in ({"padding": 1, "stride": 2}, {"padding": "same", "dilation": 2},
               {"padding": 1, "padding_mode": "reflect"}):  # fmt: skip
        conv = nn.Conv2d(3, 5, (3, 2), bias=False, **kw)
        x = torch.randn(2, 3, 9, 8, generator=gen)
        cols, b = compat.input_columns(conv, "conv2d", x)
        assert b == 2 and cols.shape[0] == 3 * 3 * 2
        y = conv(x)  # [2, 5, oh, ow]
        y2 = (conv.weight.flatten(1) @ cols).reshape(5, 2, -1).permute(1, 0, 2)
        assert torch.allclose(y2, y.flatten(2), atol=1e-5), kw


def test_sparsegpt_conv2d_matches_reference(gen):
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    conv.weight.data = torch.randn(8, 4, 3, 3, generator=gen) * 0.1
    ref_conv = clone_layer(conv)
    ad, ref = compat.SparseGPT(conv), RefSparseGPT(ref_conv)
    assert (ad.rows, ad.columns) == (8, 36)
    feed([ad, ref], [torch.randn(2, 4, 6, 6, generator=gen) for _ in range(3)])
    assert ad.nsamples == 6
    assert torch.allclose(ad.H, ref.H, rtol=1e-5, atol=1e-7)
    ad.fasterprune(0.5, blocksize=16)
    ref.fasterprune(0.5, blocksize=16)
    assert conv.weight.shape == (8, 4, 3, 3)
    assert_same_pruning(conv, ref_conv, "SparseGPT Conv2d")
    with pytest.raises(ValueError, match="grouped"):
        compat.SparseGPT(nn.Conv2d(4, 8, 3, groups=2))


def test_transformers_conv1d_layers(gen):
    """GPT-2 style Conv1D (weight [in, out]) through SparseGPT, ROSE and WrappedGPT; the
    original ROSE would not transpose it back, the adapter does."""
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    del transformers
    cols, rows = 128, 24
    W, _, X = random_layer(rows, cols, nsamples=4, tokens=16, columnar=True, blocksize=16,
                           generator=gen)  # fmt: skip
    layers = []
    for _ in range(3):
        c = Conv1D(rows, cols)
        c.weight.data = W.t().clone()
        layers.append(c)
    ad_s, ref_s = compat.SparseGPT(layers[0]), RefSparseGPT(layers[1])
    ad_r = compat.ROSE(layers[2])
    assert (ad_s.rows, ad_s.columns) == (rows, cols)
    feed([ad_s, ref_s, ad_r], [X[:2], X[2], X[3:]])
    H = ad_s.H.clone()
    ad_s.fasterprune(0.5, blocksize=16)
    ref_s.fasterprune(0.5, blocksize=16)
    assert layers[0].weight.shape == (cols, rows)
    assert_same_pruning(layers[0], layers[1], "Conv1D SparseGPT")
    r = ad_r.fasterprune(0.5, blocksize=16)
    assert r.info["reordered"]
    own = compat.rose_with_scaler(W, H, ad_r.scaler_row, 0.5, blocksize=16)
    assert torch.equal(layers[2].weight.data, own.weight.t())
    wr = compat.WrappedGPT(Conv1D(rows, cols))
    feed([wr], [X[:2], X[2], X[3:]])
    assert torch.allclose(wr.scaler_row, torch.diagonal(H) / 2, rtol=1e-4, atol=1e-7)
    # llm-compressor's contract for Conv1D: transposed in, transposed back
    c = Conv1D(rows, cols)
    c.weight.data = W.t().clone()
    loss, Wp = compat.sparsify_weight(c, {c: H.clone()}, 0.5, 0, 0, 16, 0.01, False)
    ref_loss, ref_W = ref_sparsify_weight(W, H, 0.5, 0, 0, 16, 0.01, False)
    assert Wp.shape == (cols, rows)
    assert_masks_agree(Wp.t() == 0, ref_W == 0, MASK_AGREE)
    assert relative_error(Wp.t(), ref_W) < WEIGHT_RTOL
    assert loss == pytest.approx(ref_loss, rel=1e-4)


def test_adapter_errors(gen):
    with pytest.raises(TypeError, match="nn.Linear"):
        compat.SparseGPT(nn.LayerNorm(8))
    layer = nn.Linear(8, 4)
    ad = compat.SparseGPT(layer)
    with pytest.raises(RuntimeError, match="add_batch"):
        ad.fasterprune(0.5)
    with pytest.raises(ValueError, match="input features"):
        ad.add_batch(torch.randn(2, 3, 7), None)
    ad.add_batch(torch.randn(2, 3, 8, generator=gen), None)
    ad.quantizer = RefQuantizer()  # never configured
    with pytest.raises(ValueError, match="configure"):
        ad.fasterprune(0.5)
    for kw, what in [({"mse": True}, "mse=True"), ({"perchannel": False}, "perchannel=False"),
                     ({"grouprows": 2}, "grouprows=2")]:  # fmt: skip
        ad.quantizer = RefQuantizer()
        ad.quantizer.configure(4, **{"perchannel": True, "sym": False, **kw})
        with pytest.raises(NotImplementedError, match=what):
            ad.fasterprune(0.5)
    ad.quantizer.configure(4, perchannel=True, sym=False)
    ad.quantizer.scale = torch.ones(4, 1)  # a grid set beforehand
    with pytest.raises(NotImplementedError, match="ready"):
        ad.fasterprune(0.5)
    ad.quantizer = RefQuantizer()
    ad.quantizer.configure(1, perchannel=True)
    with pytest.raises(NotImplementedError, match="maxq=1"):
        ad.fasterprune(0.5)
    del ad.quantizer
    with pytest.raises(TypeError, match="prune_n"):
        ad.fasterprune(0.5, 2, 4, prune_n=1, prune_m=4)
    ad.fasterprune(0.5)
    with pytest.raises(RuntimeError, match="already ran"):
        ad.fasterprune(0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adapters_on_cuda_match_cpu(gen):
    """backend='auto' on CUDA layers (fused kernels where available) against the CPU torch
    reference on the same inputs."""
    layer, batches = linear_with_inputs(gen, 64, 256, columnar=True, blocksize=64)
    cases = [(compat.SparseGPT, {}), (compat.ROSE, {}), (compat.ROSE, {"prune_n": 2, "prune_m": 4})]
    for cls, kw in cases:
        cpu, gpu = clone_layer(layer), clone_layer(layer).cuda()
        a, b = cls(cpu, backend="torch"), cls(gpu)
        feed([a], batches)
        feed([b], [x.cuda() for x in batches])
        a.fasterprune(0.5, blocksize=64, **kw)
        rb = b.fasterprune(0.5, blocksize=64, **kw)
        assert gpu.weight.is_cuda and rb.weight.is_cuda
        assert_same_pruning(gpu.cpu(), cpu, f"{cls.__name__} {kw} cuda vs cpu")
    W, H, _ = random_layer(64, 256, generator=gen)
    cpu, gpu = nn.Linear(256, 64, bias=False), nn.Linear(256, 64, bias=False).cuda()
    cpu.weight.data, gpu.weight.data = W.clone(), W.cuda()
    _, Wa = compat.sparsify_weight(cpu, {cpu: H.clone()}, 0.5, 0, 0, 64, 0.01, True)
    _, Wb = compat.sparsify_weight(gpu, {gpu: H.cuda()}, 0.5, 0, 0, 64, 0.01, True)
    assert_masks_agree(Wb.cpu() == 0, Wa == 0, MASK_AGREE)
    assert relative_error(Wb.cpu(), Wa) < WEIGHT_RTOL


# ----------------------------------------------------------------------------------- ROSE


def test_rose_scaler_weights_sample_k_by_one_over_k(gen):
    """The ROSE add_batch gives `(2/N) sum_k ||x_k||^2 / n_k` (n_k: samples seen once the
    batch holding k was added), computed here independently in float64."""
    layer, batches = linear_with_inputs(gen, 8, 40)
    ad, ref = compat.ROSE(layer), RefROSE(clone_layer(layer))
    feed([ad, ref], batches)
    expect, seen = torch.zeros(40, dtype=torch.float64), 0
    for x in batches:
        xs = x.double() if x.dim() == 3 else x.double().unsqueeze(0)
        seen += xs.shape[0]
        expect += (xs**2).sum((0, 1)) / seen
    expect *= 2 / seen
    assert torch.allclose(ad.scaler_row.double(), expect, rtol=1e-5)
    assert torch.equal(ad.scaler_row, ref.scaler_row)
    assert torch.allclose(ad.H, ref.H, rtol=1e-6)
    # and it is not Wanda's equal-weight scaler
    assert not torch.allclose(ad.scaler_row, torch.diagonal(ad.H) / 2, rtol=1e-3)


@pytest.mark.parametrize(
    "columnar,pattern", [(False, (0, 0)), (True, (0, 0)), (False, (2, 4))], ids=str
)
def test_rose_matches_original_where_it_runs(gen, columnar, pattern):
    n, m = pattern
    layer, batches = linear_with_inputs(gen, 20, 128, columnar=columnar, blocksize=16)
    if n:  # N:M group losses of LLM-like layers spread too much: the original would crash
        W = torch.randn(20, 128, generator=gen).sign() * (
            1 + 0.1 * torch.rand(20, 128, generator=gen)
        )
        layer.weight.data = W * 0.05
        batches = [torch.randn(2, 48, 128, generator=gen), torch.randn(48, 128, generator=gen)]
    ref_layer = clone_layer(layer)
    W0 = layer.weight.data.clone()
    ad, ref = compat.ROSE(layer), RefROSE(ref_layer)
    feed([ad, ref], batches)
    H, scaler = ad.H.clone(), ad.scaler_row.clone()
    r = ad.fasterprune(0.5, prune_n=n, prune_m=m, blocksize=16)
    ste = ref.fasterprune(0.5, prune_n=n, prune_m=m, blocksize=16)
    assert r.info["relative_range"] == pytest.approx(ste, rel=1e-5)
    assert r.info["reordered"] == (ste > 0.5)
    if columnar:
        assert r.info["reordered"]
    assert_same_pruning(layer, ref_layer, "ROSE vs original")
    own = compat.rose_with_scaler(W0, H, scaler, 0.5, n, m, blocksize=16)
    assert torch.equal(layer.weight.data, own.weight)
    assert ad.result is r and ad.free() is None and ad.scaler_row is None


def test_rose_nm_columnar_works_where_original_crashes(gen):
    W, H, _ = random_layer(16, 64, columnar=True, blocksize=4, generator=gen)
    scaler = torch.diagonal(H) / 2
    with pytest.raises(NotImplementedError):
        original_rose(W, H, scaler, 0.5, 2, 4, 128)
    layer = nn.Linear(64, 16, bias=False)
    layer.weight.data = W.clone()
    ad = compat.ROSE(layer)
    ad.H, ad.nsamples, ad.scaler_row = H.clone(), 4, scaler.clone()
    r = ad.fasterprune(0.5, prune_n=2, prune_m=4)
    assert r.info["reordered"]
    assert fp.check_nm_keep_mask(layer.weight.data != 0, 2, 4)
    # with the equal-weight scaler the adapter is exactly fastprune.rose_layer
    own = fp.rose_layer(W, H, prune_n=2, prune_m=4, inverse_method="reference")
    assert torch.equal(layer.weight.data, own.weight) and torch.equal(r.mask, own.mask)
    assert r.loss == pytest.approx(own.loss)


@pytest.mark.parametrize("cols,bs", [(100, 16), (120, 16), (70, 32)])
def test_rose_partial_last_block_columnar(gen, cols, bs):
    """The original crashes on a reordered layer whose last block is partial; the adapter
    orders all blocks by their loss sums (the original's rule, the partial one included)
    and sweeps each with its own size. Oracle: the original's own block losses, range and
    column orders, then the original SparseGPT loop on that permutation with those widths."""
    W, H, _ = random_layer(12, cols, columnar=True, blocksize=bs, generator=gen)
    scaler = torch.diagonal(H) / 2 * torch.linspace(1, 2, cols)  # any non-negative scaler
    with pytest.raises(NotImplementedError):
        original_rose(W, H, scaler, 0.5, blocksize=bs)
    r = compat.rose_with_scaler(W, H, scaler, 0.5, blocksize=bs)
    assert r.info["reordered"] and r.info["range_rule"] == "block_sum"
    score = W.abs() * torch.sqrt(scaler).reshape(1, -1)
    reorder_column, losses = _rose_block_losses(score, cols, bs, 0.5)
    ste = ((losses.max() - losses.min()) / losses.max()).item()
    assert r.info["relative_range"] == pytest.approx(ste, rel=1e-5)
    order = torch.sort(losses, descending=True, stable=True).indices.tolist()
    blocks = [reorder_column[b * bs : min(cols, (b + 1) * bs)] for b in order]
    perm = torch.cat(blocks)
    Wq, pruned = original_sparsegpt(
        W[:, perm], H[perm][:, perm], 0.5, widths=[len(x) for x in blocks]
    )
    inv = torch.argsort(perm)
    assert_masks_agree(~r.mask, pruned[:, inv], MASK_AGREE)
    assert relative_error(r.weight, Wq[:, inv]) < WEIGHT_RTOL
    # the sweep keeps each ROSE block's budget: int(numel*s)+1 pruned (no ties)
    for block_cols in blocks:
        assert (~r.mask[:, block_cols]).sum().item() == int(12 * len(block_cols) * 0.5) + 1
    own = fp.rose_layer(
        W, H, 0.5, blocksize=bs, scaler=scaler, inverse_method="reference", range_rule="block_sum"
    )
    assert torch.equal(own.weight, r.weight) and torch.equal(own.mask, r.mask)


def test_rose_equal_scaler_is_rose_layer(gen):
    W, H, _ = random_layer(16, 128, columnar=True, blocksize=16, generator=gen)
    a = compat.rose_with_scaler(W, H, torch.diagonal(H) / 2, 0.5, blocksize=16)
    b = fp.rose_layer(W, H, 0.5, blocksize=16, inverse_method="reference")
    assert a.info["reordered"] and b.info["reordered"]
    assert a.info["relative_range"] == b.info["relative_range"]
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="scaler_row"):
        compat.rose_with_scaler(W, H, -torch.ones(128), 0.5)
    with pytest.raises(ValueError, match="scaler_row"):
        compat.rose_with_scaler(W, H, torch.ones(127), 0.5)


# ---------------------------------------------------------------------------------- Wanda


@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)])
def test_wrapped_gpt_matches_wanda(gen, pattern):
    n, m = pattern
    layer, batches = linear_with_inputs(gen, 16, 64)
    W0 = layer.weight.data.clone()
    ad, ref = compat.WrappedGPT(layer, layer_id=3, layer_name="q"), RefWrappedGPT(layer)
    acc = fp.HessianAccumulator(64)
    feed([ad, ref], batches)
    for x in batches:
        acc.add_batch(x)
    assert (ad.rows, ad.columns, ad.nsamples, ad.layer_id) == (16, 64, 5, 3)
    assert torch.allclose(ad.scaler_row, ref.scaler_row, rtol=1e-6)
    assert torch.allclose(ad.scaler_row, torch.diagonal(acc.H) / 2, rtol=1e-4)
    r = ad.prune(0.5, n, m)
    expect, pruned = original_wanda(W0, ref.scaler_row, 0.5, n, m)
    assert torch.equal(layer.weight.data, expect)
    assert torch.equal(~r.mask, pruned)
    own = fp.wanda_layer(W0, acc.H, 0.5, n, m)
    assert_masks_agree(r.mask, own.mask, MASK_AGREE)
    # the diagonal alone, as a pipeline keeps it for Wanda: Wanda's statistic bit for bit
    diag = fp.DiagonalAccumulator(64)
    for x in batches:
        diag.add_batch(x)
    assert torch.equal(diag.scaler_row, ref.scaler_row) and diag.nsamples == ref.nsamples
    exact = fp.wanda_layer(W0, diag.H, 0.5, n, m)
    assert torch.equal(~exact.mask, pruned) and torch.equal(exact.weight, expect)


# ------------------------------------------------------------------------- llm-compressor


@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)])
def test_sparsify_weight_contract(gen, pattern):
    n, m = pattern
    W, H, _ = random_layer(24, 160, dead=3, generator=gen)
    layer = nn.Linear(160, 24, bias=False)
    layer.weight.data = W.half()
    other = nn.Linear(4, 4)
    hessians = {layer: H.clone(), other: torch.eye(4)}
    loss, Wp = compat.sparsify_weight(layer, hessians, 0.5, n, m, 64, 0.01, False)
    assert list(hessians) == [other]  # consumed, the others untouched
    assert torch.equal(layer.weight.data, W.half())  # the module is not modified
    assert Wp.dtype == torch.float16 and Wp.shape == W.shape
    ref_loss, ref_W = ref_sparsify_weight(W.half().float(), H, 0.5, n, m, 64, 0.01, False)
    assert_masks_agree(Wp == 0, ref_W.half() == 0, MASK_AGREE)
    assert relative_error(Wp.float(), ref_W.half().float()) < 2e-3  # float16 output
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    own = fp.sparsegpt_layer(
        W.half().float(), H, 0.5, n, m, blocksize=64, inverse_method="reference"
    )
    assert torch.equal(Wp, own.weight.half())


@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)])
def test_sparsify_weight_preserve_sparsity_mask(gen, pattern):
    n, m = pattern
    W, H, _ = random_layer(24, 160, generator=gen)
    W[torch.rand(W.shape, generator=gen) < 0.3] = 0  # a previously pruned layer
    W[:, 64:96][torch.rand(24, 32, generator=gen) < 0.4] = 0  # one block over the target
    base = W == 0
    layer = nn.Linear(160, 24, bias=False)
    layer.weight.data = W.clone()
    if n:  # one block: llm-compressor's loop as it is
        _, Wp1 = compat.sparsify_weight(layer, {layer: H.clone()}, 0.5, n, m, 160, 0.01, True)
        _, ref_W1 = ref_sparsify_weight(W, H, 0.5, n, m, 160, 0.01, True)
        assert_masks_agree(Wp1 == 0, ref_W1 == 0, MASK_AGREE)
        assert relative_error(Wp1, ref_W1) < WEIGHT_RTOL
    loss, Wp = compat.sparsify_weight(layer, {layer: H.clone()}, 0.5, n, m, 32, 0.01, True)
    ref_loss, ref_W = ref_sparsify_weight(W, H, 0.5, n, m, 32, 0.01, True, fixed_index=True)
    assert (Wp[base] == 0).all()  # every old zero stays pruned
    assert_masks_agree(Wp == 0, ref_W == 0, MASK_AGREE)
    assert relative_error(Wp, ref_W) < WEIGHT_RTOL
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    if n:
        assert ((Wp == 0).reshape(24, -1, m).sum(-1) >= n).all()
    # not the same as ignoring the old mask
    _, free_W = compat.sparsify_weight(layer, {layer: H.clone()}, 0.5, n, m, 32, 0.01, False)
    assert not torch.equal(free_W == 0, Wp == 0)
    too_sparse = nn.Linear(160, 24, bias=False)
    too_sparse.weight.data = W.masked_fill(torch.rand(W.shape, generator=gen) < 0.5, 0)
    with pytest.raises(ValueError, match="preserve_sparsity_mask"):
        compat.sparsify_weight(too_sparse, {too_sparse: H}, 0.5, 0, 0, 32, 0.01, True)


@pytest.mark.parametrize(
    "cols,pattern,block,preserve",
    [(130, (2, 4), 64, False), (130, (2, 4), 64, True), (27, (2, 4), 128, False)],
    ids=str,
)
def test_sparsify_weight_nm_partial_last_group(gen, caplog, cols, pattern, block, preserve):
    """llm-compressor prunes N:M layers whose width is not a multiple of M: full groups as
    usual, then the `prune_n` lowest of the partial last group (130 columns, 2:4: both of
    the last 2; 27 columns: 2 of the last 3). Oracle: its loop, restated."""
    n, m = pattern
    W, H, _ = random_layer(16, cols, generator=gen)
    if preserve:
        W[torch.rand(W.shape, generator=gen) < 0.2] = 0
    if cols == 27:  # a Conv2d(3, 16, 3) stem: weight [16, 3, 3, 3] flattened to 27 columns
        layer = nn.Conv2d(3, 16, 3, bias=False)
        layer.weight.data = W.reshape(16, 3, 3, 3).clone()
    else:
        layer = nn.Linear(cols, 16, bias=False)
        layer.weight.data = W.clone()
    with caplog.at_level("INFO", logger="fastprune"):
        loss, Wp = compat.sparsify_weight(
            layer, {layer: H.clone()}, 0.5, n, m, block, 0.01, preserve
        )
    assert "partial last group" in caplog.text
    Wp = Wp.reshape(16, cols)
    ref_loss, ref_W = ref_sparsify_weight(W, H, 0.5, n, m, block, 0.01, preserve, fixed_index=True)
    assert_masks_agree(Wp == 0, ref_W == 0, MASK_AGREE)
    assert relative_error(Wp, ref_W) < WEIGHT_RTOL
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    full = cols - cols % m
    assert ((Wp[:, :full] == 0).reshape(16, -1, m).sum(-1) >= n).all()
    assert ((Wp[:, full:] == 0).sum(1) >= n).all()  # n pruned in the partial group too
    if not preserve:
        assert fp.check_nm_keep_mask(Wp[:, :full] != 0, n, m)
        assert ((Wp[:, full:] == 0).sum(1) == n).all()


def test_sparsify_weight_partial_group_narrower_than_n(gen):
    """27 columns with 4:8 leave a group of 3 < 4, where llm-compressor's topk fails: those
    columns stay dense; the full groups are pruned 4:8."""
    W, H, _ = random_layer(16, 27, generator=gen)
    with pytest.raises(RuntimeError):
        ref_sparsify_weight(W, H, 0.5, 4, 8, 128, 0.01, False)
    layer = nn.Conv2d(3, 16, 3, bias=False)
    layer.weight.data = W.reshape(16, 3, 3, 3).clone()
    _, Wp = compat.sparsify_weight(layer, {layer: H.clone()}, 0.5, 4, 8, 128, 0.01, False)
    Wp = Wp.reshape(16, 27)
    assert fp.check_nm_keep_mask(Wp[:, :24] != 0, 4, 8)
    assert (Wp[:, 24:] != 0).all()
    with pytest.raises(ValueError, match="prune_n must be < prune_m"):
        compat.sparsify_weight(layer, {layer: H.clone()}, 0.5, 8, 8, 128, 0.01, False)


def test_patch_llmcompressor_without_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llmcompressor", None)  # import raises ImportError
    with pytest.raises(ImportError, match="pip install llmcompressor"):
        compat.patch_llmcompressor()


def _tiny_llama_oneshot(tmp_path, patched: bool, recipe=None, width=(64, 96)):
    """A 2-layer Llama through llm-compressor's oneshot with `recipe` (default: SparseGPT
    at 0.5), patched to fastprune or not; returns the projections' parameters."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=width[0],
        intermediate_size=width[1],
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    cfg.save_pretrained(tmp_path)  # oneshot re-reads the config from name_or_path
    model.config.name_or_path = str(tmp_path)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>"
    )
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 96, (1, 24), generator=g),
             "attention_mask": torch.ones(1, 24, dtype=torch.long)} for _ in range(6)]  # fmt: skip
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    if recipe is None:
        recipe = SparseGPTModifier(
            sparsity=0.5, block_size=32, targets=["Linear"], ignore=["re:.*lm_head"]
        )
    if patched:
        compat.patch_llmcompressor()
    try:
        oneshot(model=model, dataset=loader, recipe=recipe, processor=tok,
                num_calibration_samples=6)  # fmt: skip
    finally:
        if patched:
            compat.unpatch_llmcompressor()
    return {k: v.detach().clone() for k, v in model.named_parameters() if "proj" in k}


def test_llmcompressor_oneshot_same_weights_with_patch(tmp_path, monkeypatch):
    pytest.importorskip("llmcompressor")
    import llmcompressor.modifiers.pruning.sparsegpt.base as base

    original = base.sparsify_weight
    calls = []
    real = compat.llmcompressor.sparsegpt_layer

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(compat.llmcompressor, "sparsegpt_layer", counting)
    ref = _tiny_llama_oneshot(tmp_path / "a", patched=False)
    assert not calls
    ours = _tiny_llama_oneshot(tmp_path / "b", patched=True)
    assert len(calls) == 14  # 7 linears x 2 decoder layers went through fastprune
    assert base.sparsify_weight is original  # unpatched again
    assert ref.keys() == ours.keys() and len(ref) == 14
    for k in ref:
        assert (ref[k] == 0).float().mean() > 0.45, k
        assert_masks_agree(ours[k] == 0, ref[k] == 0, MASK_AGREE, what=k)
        assert relative_error(ours[k], ref[k]) < 1e-3, k  # rounding carried through layers
    assert compat.patch_llmcompressor() == compat.patch_llmcompressor()  # idempotent
    assert base.sparsify_weight is compat.sparsify_weight
    compat.unpatch_llmcompressor()
    assert base.sparsify_weight is original


def _llmc_codes(params, name):
    """The integer codes of a quantized projection: `round(w / scale) + zero_point` over
    its groups (compressed-tensors' signed codes), and the scales."""
    W, scale = params[name + ".weight"], params[name + ".weight_scale"]
    zp = params[name + ".weight_zero_point"]
    gs = W.shape[1] // scale.shape[1]
    s = scale.repeat_interleave(gs, 1)
    z = zp.float().repeat_interleave(gs, 1)
    return torch.round(W / s) + z, scale


@pytest.mark.parametrize("scheme", ["w4a16_group", "int4_channel_asym"])
def test_llmcompressor_gptq_oneshot_same_codes_with_patch(tmp_path, monkeypatch, scheme):
    """llm-compressor's GPTQModifier through oneshot, patched to fastprune or not: the same
    integer codes and scales (W4A16: groups of 128, llm-compressor's default act-order
    "static"; 4-bit per channel, asymmetric, no act-order), and fastprune ran each layer."""
    pytest.importorskip("llmcompressor")
    import llmcompressor.modifiers.gptq.base as base
    from llmcompressor.modifiers.gptq import GPTQModifier

    def recipe():
        kw = dict(targets=["Linear"], ignore=["lm_head"], block_size=64)
        if scheme == "w4a16_group":
            return GPTQModifier(scheme="W4A16", **kw)
        weights = dict(num_bits=4, type="int", symmetric=False, strategy="channel")
        groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
        return GPTQModifier(config_groups=groups, actorder=None, **kw)

    original = base.quantize_weight
    calls = []
    real = compat.llmc_gptq.gptq_quantize_one

    def counting(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(compat.llmc_gptq, "gptq_quantize_one", counting)
    ref = _tiny_llama_oneshot(tmp_path / "a", False, recipe(), width=(128, 256))
    assert not calls
    ours = _tiny_llama_oneshot(tmp_path / "b", True, recipe(), width=(128, 256))
    assert len(calls) == 14  # 7 linears x 2 decoder layers went through fastprune
    assert base.quantize_weight is original  # unpatched again
    assert ref.keys() == ours.keys()
    names = sorted({k.rsplit(".", 1)[0] for k in ref if k.endswith(".weight_scale")})
    assert len(names) == 14
    differ = total = 0
    for name in names:
        c_ref, s_ref = _llmc_codes(ref, name)
        c_ours, s_ours = _llmc_codes(ours, name)
        assert torch.equal(s_ours, s_ref), name  # the observer's grids, from W
        assert ((c_ref >= -8) & (c_ref <= 7)).all() and torch.equal(c_ref, c_ref.round())
        if scheme == "w4a16_group":
            assert s_ref.shape[1] == c_ref.shape[1] // 128
        else:
            assert s_ref.shape[1] == 1 and ref[name + ".weight_zero_point"].any()
        differ += (c_ours != c_ref).sum().item()
        total += c_ref.numel()
        # a code differs only at a float near-tie: one level apart
        assert (c_ours - c_ref).abs().max() <= 1, name
    assert differ <= 1e-4 * total, f"{differ} of {total} codes differ"


def minmax_qparams(W, bits, sym, strategy, group_size=None):
    """compressed-tensors' min-max `calculate_qparams` of a weight: `(scale, zero_point)`
    `[rows, groups]` (tensor: `[1]`), the zero point signed int8 (0 when symmetric)."""
    rows, cols = W.shape
    if strategy == "group":
        Wg = W.reshape(rows, cols // group_size, group_size)
    elif strategy == "channel":
        Wg = W.reshape(rows, 1, cols)
    else:
        Wg = W.reshape(1, -1)
    mn = torch.clamp(Wg.amin(-1), max=0)
    mx = torch.clamp(Wg.amax(-1), min=0)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if sym:
        scale = torch.maximum(mn.abs(), mx) / ((qmax - qmin) / 2)
        zp = torch.zeros_like(scale)
    else:
        scale = (mx - mn) / (qmax - qmin)
        zp = torch.clamp(qmin - mn / scale, qmin, qmax)
    return scale, torch.round(zp).to(torch.int8)


def ref_llmc_quantize_weight(W, H, scale, zp, bits, strategy, gs, sym, actorder, bs, percdamp):
    """llm-compressor 0.14's `quantize_weight` (its eager block update) on one layer: the
    observer's grids given; act-order "weight" sweeps the columns by decreasing diag(H),
    each on its original group's grid. Returns `(Q, loss)`."""
    W, H = W.clone().float(), H.clone().float()
    rows, cols = W.shape
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    g_idx = torch.arange(cols) // gs if strategy == "group" else torch.zeros(cols, dtype=int)
    g_idx = g_idx if perm is None else g_idx[perm]
    if strategy == "tensor":
        scale, zp = scale.reshape(1, 1).expand(rows, 1), zp.reshape(1, 1).expand(rows, 1)
    eff, zpe = scale[:, g_idx], zp[:, g_idx].float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(cols)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    loss = 0.0
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        for i in range(i2 - i1):
            w, s, z = W1[:, i], eff[:, i1 + i], zpe[:, i1 + i]
            x = w / s if sym else w / s + z
            q = torch.round(torch.clamp(x, qmin, qmax))
            q = q * s if sym else (q - z) * s
            err = (w - q) / Hinv1[i, i]
            Q1[:, i], Err1[:, i] = q, err
            loss += (err * err).sum().item() / 2
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return (W if perm is None else W[:, torch.argsort(perm)]), loss


def quant_args(**kw):
    """llm-compressor's weight `QuantizationArgs` as the patched function reads them."""
    base = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32,
                actorder=None)  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(
    "strategy,sym,actorder",
    [("group", True, None), ("group", False, "weight"), ("group", True, "static"),
     ("channel", False, None), ("channel", True, "weight"), ("tensor", False, None)],
    ids=str,
)  # fmt: skip
def test_llmcompressor_quantize_weight_contract(gen, strategy, sym, actorder):
    """`compat.quantize_weight` against llm-compressor 0.14's loop restated, on its own
    grids: the same quantized weights (codes equal up to counted near-ties) and loss, the
    result in the stacked weights' shape and dtype, one layer of a batch at a time."""
    W, H, _ = random_layer(24, 192, dead=2, columnar=True, blocksize=16, generator=gen)
    W2, H2, _ = random_layer(24, 192, generator=gen)
    qa = quant_args(strategy=strategy, symmetric=sym, actorder=actorder)
    grids = [minmax_qparams(w, 4, sym, strategy, 32) for w in (W, W2)]
    scale = torch.stack([s for s, _ in grids])
    zp = torch.stack([z for _, z in grids])
    weights, hessians = torch.stack([W, W2]), torch.stack([H, H2])
    Q, losses, rtn = compat.quantize_weight(weights, hessians.clone(), scale, zp, None, qa, 64)
    assert Q.shape == weights.shape and Q.dtype == weights.dtype
    assert losses.shape == (2,) and rtn.dtype == torch.bool and not rtn.any()
    for b, (w, h) in enumerate([(W, H), (W2, H2)]):
        ref_Q, ref_loss = ref_llmc_quantize_weight(
            w, h, scale[b], zp[b], 4, strategy, 32, sym, actorder, 64, 0.01
        )
        g = torch.arange(192) // 32 if strategy == "group" else torch.zeros(192, dtype=int)
        s = scale[b].reshape(-1, 1)[:, :1] if strategy != "group" else scale[b][:, g]
        s = s.expand(24, 192)
        codes, ref_codes = torch.round(Q[b] / s), torch.round(ref_Q / s)
        assert torch.allclose(codes * s, Q[b], rtol=0, atol=1e-6)  # on the grid
        differ = (codes != ref_codes).sum().item()
        assert differ <= 1e-3 * codes.numel(), f"{differ} codes differ"
        assert relative_error(Q[b], ref_Q) < 1e-2
        assert losses[b].item() == pytest.approx(ref_loss, rel=1e-3)


def test_llmcompressor_quantize_weight_refuses_what_it_does_not_offer(gen):
    W, H, _ = random_layer(8, 64, generator=gen)
    scale, zp = minmax_qparams(W, 4, True, "group", 32)
    args = (W[None], H[None], scale[None], zp[None])
    refused = [
        ({"type": "float"}, "type='float'"),
        ({"strategy": "block"}, "block"),
        ({"strategy": "tensor_group"}, "tensor_group"),
        ({"actorder": "group"}, "actorder='group'"),
        ({"num_bits": 16}, "num_bits"),
    ]
    for kw, what in refused:
        with pytest.raises(NotImplementedError, match=what):
            compat.quantize_weight(*args, None, quant_args(**kw))
    with pytest.raises(NotImplementedError, match="global scale"):
        compat.quantize_weight(*args, torch.ones(1), quant_args())
    with pytest.raises(ValueError, match="batch"):
        compat.quantize_weight(W, H, scale, zp, None, quant_args())
    with pytest.raises(TypeError, match="percdamp"):  # dampening_frac=None
        compat.quantize_weight(*args, None, quant_args(), 64, None)
    with pytest.raises(ValueError, match="blocksize"):
        compat.quantize_weight(*args, None, quant_args(), 0)


def _fake_llmc(monkeypatch, quantize_weight):
    """Stand-in llm-compressor modules holding `sparsify_weight` and `quantize_weight`."""
    import types

    def sparsify_weight(*a):
        raise AssertionError("not called")

    mods = {}
    gptq = ["llmcompressor.modifiers.gptq.base", "llmcompressor.modifiers.gptq.gptq_quantize"]
    for name in ["llmcompressor", "llmcompressor.modifiers.pruning.sparsegpt.base", *gptq]:
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    mods["llmcompressor"].__version__ = "0.0-test"
    mods["llmcompressor.modifiers.pruning.sparsegpt.base"].sparsify_weight = sparsify_weight
    for name in gptq:
        mods[name].quantize_weight = quantize_weight
    for name in ["llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify",
                 "llmcompressor.modifiers.obcq.base", "llmcompressor.modifiers.obcq.sgpt_sparsify",
                 "llmcompressor.modifiers.quantization.gptq.base",
                 "llmcompressor.modifiers.quantization.gptq.gptq_quantize"]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, None)  # absent
    return mods, sparsify_weight


def test_patch_llmcompressor_gptq_signatures(monkeypatch):
    """The GPTQ patch: idempotent and restorable as the SparseGPT one; a `quantize_weight`
    of another signature (an older llm-compressor's) is refused by name, nothing patched."""

    def known(weights, hessians, scale, zero_point, global_scale, quant_args, blocksize=128,
              percdamp=0.01):  # fmt: skip
        raise AssertionError("not called")

    def older(module, quant_args, hessians_dict, blocksize=128, percdamp=0.01):
        raise AssertionError("not called")

    mods, sparsify = _fake_llmc(monkeypatch, known)
    base, qmod = (
        mods["llmcompressor.modifiers.gptq.base"],
        mods["llmcompressor.modifiers.gptq.gptq_quantize"],
    )
    sgpt = mods["llmcompressor.modifiers.pruning.sparsegpt.base"]
    try:
        patched = compat.patch_llmcompressor()
        assert patched == compat.patch_llmcompressor()  # idempotent
        assert len(patched) == 3
        assert base.quantize_weight is qmod.quantize_weight is compat.quantize_weight
        assert sgpt.sparsify_weight is compat.sparsify_weight
    finally:
        assert len(compat.unpatch_llmcompressor()) == 3
    assert base.quantize_weight is known and sgpt.sparsify_weight is sparsify
    assert compat.patch_llmcompressor(gptq=False) == [sgpt.__name__]
    assert base.quantize_weight is known
    compat.unpatch_llmcompressor()
    base.quantize_weight = qmod.quantize_weight = older
    with pytest.raises(ImportError, match=r"0\.0-test.*gptq=False"):
        compat.patch_llmcompressor()
    assert sgpt.sparsify_weight is sparsify and base.quantize_weight is older  # untouched
    assert compat.patch_llmcompressor(gptq=False) == [sgpt.__name__]
    compat.unpatch_llmcompressor()
    del base.quantize_weight, qmod.quantize_weight
    with pytest.raises(ImportError, match="no GPTQ quantize_weight"):
        compat.patch_llmcompressor()
    assert sgpt.sparsify_weight is sparsify
