"""GPTQ and the joint sparse + quantized sweep against the research code: IST-DASLab GPTQ
`fasterquant` and SparseGPT `--wbits` (restated in fastprune.original), llm-compressor's
`quantize_weight` (restated here).

Codes are compared entry by entry: a float32 sweep may round a weight that lies half-way
between two levels (within float32 rounding) to the other one, and that row then follows a
slightly different path; the tests count such rows and report them, and require every other
row to agree exactly in codes and within float32 rounding in scales.
"""

from __future__ import annotations

import pytest
import torch

import fastprune as fp
from fastprune.original import original_find_params, original_gptq, original_sparsegpt
from fastprune.quant import QuantSpec, round_to_nearest
from fastprune.solvers.obs import actorder_perm
from fastprune.testing import random_layer

F64 = torch.float64
# a weight is at a near-tie when w / scale is within this of a half-way point, by the dtype
# the sweeps ran in (their updates summed in different orders)
TIE = {torch.float64: 1e-6, torch.float32: 1e-2}


def _layer(seed, rows=48, cols=256, dtype=torch.float32, **kw):
    W, H, _ = random_layer(rows, cols, generator=torch.Generator().manual_seed(seed), **kw)
    return W.to(dtype), H.to(dtype)


def ref_codes(Q, scale, zero, g):
    """Integer codes of a reference's rounded weights on its grids."""
    g = g.long()
    return torch.round(Q / scale[:, g]) + zero[:, g]


def pre_rounding(W, H, Q, actorder=False, percdamp=0.01):
    """Each weight of a sweep's result `Q` as it was just before it was rounded: the sweep
    leaves `Wc - Q = Err U` (U the upper factor of the damped inverse, in the sweep's
    order), so `w_j = q_j + Err_j U_jj` (float64)."""
    W, H, Q = W.double().clone(), H.double().clone(), Q.double()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = actorder_perm(H) if actorder else torch.arange(W.shape[1])
    W, H, Q = W[:, perm], H[perm][:, perm], Q[:, perm]
    H += percdamp * H.diagonal().mean() * torch.eye(W.shape[1], dtype=F64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Err = torch.linalg.solve_triangular(U, W - Q, upper=True, left=False)
    return (Q + Err * U.diagonal())[:, torch.argsort(perm)]


def assert_same_quant(r, Q, scale, zero, g, what, W, H, actorder=False):
    """`r.quant` against a reference's `(Q, scale, zero, g_idx)`: the same group of every
    column, the same codes, zero points and (within float32 storage) scales, except on rows
    that took another path after a near-tie: a weight half-way between two levels within
    rounding (GPTQ's symmetric grid puts a group's most negative weight exactly half-way)
    rounded to the other level. Such a row's first difference must be one level at a
    near-tie of the pre-rounding weight. Returns (codes that differ, rows they are in)."""
    qw = r.quant
    rows = Q.shape[0]
    assert torch.equal(qw.groups(), g.long()), f"{what}: groups differ"
    ours = qw.codes.double()
    theirs = ref_codes(Q, scale, zero, g).double()
    differ = ours != theirs
    bad_rows = differ.any(1)
    mismatches, n_bad = int(differ.sum()), int(bad_rows.sum())
    report = f"{what}: {mismatches} codes differ in {n_bad} of {rows} rows"
    if n_bad:  # the first difference in the sweep's order
        order = actorder_perm(H) if actorder else torch.arange(W.shape[1])
        first = order[differ[:, order].int().argmax(1)][bad_rows]
        steps = (ours - theirs)[bad_rows, first].abs()
        assert (steps == 1).all(), f"{report}; first differences {steps.tolist()} levels"
        x = pre_rounding(W, H, r.weight, actorder)[bad_rows, first]
        x = x / qw.scale.double()[bad_rows, g.long()[first]]
        gap = ((x - x.floor()) - 0.5).abs()
        assert (gap <= TIE[Q.dtype]).all(), f"{report}; no near-tie: {gap.tolist()}"
        # every group whose most negative weight is its extreme has a tie, and the thread
        # count alone changes which way float noise tips one; each row above started at one
        assert n_bad <= max(2, rows // 4), report
    ok = ~bad_rows
    rtol = 1e-6 if Q.dtype == F64 else 1e-5
    assert torch.allclose(qw.scale[ok].double(), scale[ok].double(), rtol=rtol, atol=0), (
        f"{what}: scales differ on rows with equal codes"
    )
    assert torch.equal(qw.zero[ok].double(), zero[ok].double()), f"{what}: zero points differ"
    assert torch.allclose(r.weight[ok].double(), Q[ok].double(), rtol=rtol, atol=rtol * 1e-2)
    return mismatches, n_bad


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [128, 32, 40, None])
@pytest.mark.parametrize("actorder", [False, True])
def test_gptq_layer_equals_fasterquant(bits, sym, group, actorder):
    """params="sweep" is `fasterquant` (groupsize, act-order, static_groups=False), both in
    float64. The reference finds a group's grid from W without its block's own updates of
    earlier columns, fastprune from the updated weights (the contract's rule): the two are
    the same sweep where each group starts a block, so the reference runs with
    blocksize=group."""
    W, H = _layer(bits + 2 * sym + (group or 7) + actorder, dtype=F64)
    r = fp.gptq_layer(W, H, bits, group, sym, actorder, backend="torch")
    bs = group if group is not None and group < 128 else 128
    ref = original_gptq(W, H, bits, group or -1, sym, actorder, blocksize=bs, dtype=F64)
    what = f"int{bits} sym={sym} g={group} actorder={actorder}"
    assert_same_quant(r, *ref, what, W, H, actorder)
    assert r.mask.all() and r.sparsity == 0.0
    assert (r.quant.g_idx is not None) == (actorder and group is not None)
    info = r.info["quant"]
    assert info == {
        "bits": bits, "group_size": group, "sym": sym, "format": "int", "actorder": actorder,
        "params": "sweep", "grid_error": info["grid_error"],
    }  # fmt: skip
    assert 0 < info["grid_error"] < (0.05 if bits == 4 else 1e-3)


@pytest.mark.parametrize("group", [128, 32])
def test_gptq_layer_float32_near_ties(group):
    """The same in float32 (the reference's own arithmetic): equal up to near-ties."""
    W, H = _layer(17, rows=96)
    r = fp.gptq_layer(W, H, 4, group, False, True, backend="torch")
    ref = original_gptq(W, H, 4, group, False, True, blocksize=min(group, 128))
    assert_same_quant(r, *ref, f"float32 g={group}", W, H, True)


def test_last_partial_group_as_gptq():
    """cols = 300, groups of 128: the last group has 44 columns, its grid from those alone."""
    W, H = _layer(3, rows=24, cols=300, dtype=F64)
    r = fp.gptq_layer(W, H, 4, 128, False, backend="torch")
    assert r.quant.scale.shape == (24, 3)
    ref = original_gptq(W, H, 4, 128, False, dtype=F64)
    assert_same_quant(r, *ref, "partial group", W, H)
    # with act-order the last group (in the sweep's order) is the partial one
    r = fp.gptq_layer(W, H, 4, 128, True, True, backend="torch")
    ref = original_gptq(W, H, 4, 128, True, True, dtype=F64)
    assert_same_quant(r, *ref, "partial group, act-order", W, H, True)
    assert torch.bincount(r.quant.g_idx.long()).tolist() == [128, 128, 44]


def llmcompressor_quantize_weight(W, H, bits, group_size, sym, actorder, blocksize=128):
    """llm-compressor's `quantize_weight` (GPTQModifier) with the min-max observer: the grids
    of every group found up front from the weight (permuted first with act-order "group"),
    compressed-tensors' `calculate_qparams` (signed range, zero point shifted here to
    GPTQ's unsigned one), then the column loop rounding with those grids. Returns
    (Q, scale, zero, g_idx)."""
    W, H = W.clone(), H.clone()  # llm-compressor's GPTQ_PRECISION is float32
    rows, cols = W.shape
    perm = torch.arange(cols)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    gs = group_size or cols
    g_idx = torch.arange(cols, dtype=torch.int) // gs
    bit_min, bit_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scales, zps = [], []
    for j in range(0, cols, gs):
        x = W[:, j : j + gs]
        mn = torch.clamp(x.amin(1), max=0)
        mx = torch.clamp(x.amax(1), min=0)
        if sym:
            scale = torch.maximum(mn.abs(), mx.abs()) / ((bit_max - bit_min) / 2)
            zp = torch.zeros_like(scale)
        else:
            scale = (mx - mn) / (bit_max - bit_min)
            zp = torch.clamp(torch.round(bit_min - mn / scale), bit_min, bit_max)
        scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
        scales.append(scale)
        zps.append(zp)
    scale, zp = torch.stack(scales, 1), torch.stack(zps, 1)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = 0.01 * torch.mean(torch.diag(H))
    idx = torch.arange(cols)
    H[idx, idx] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            g = g_idx[i1 + i]
            s, z = scale[:, g], zp[:, g]
            q = (torch.clamp(torch.round(w / s + z), bit_min, bit_max) - z) * s
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    invperm = torch.argsort(perm)
    return W[:, invperm], scale, zp - bit_min, g_idx[invperm]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [128, 32, None])
@pytest.mark.parametrize("actorder", [False, True])
def test_static_params_equal_llmcompressor(bits, sym, group, actorder):
    """params="static" is llm-compressor's `quantize_weight` (act-order "group"), in float64
    (its own precision is float32: `test_static_params_float32`); cols = 320: a last
    partial group of 64 (of 128)."""
    W, H = _layer(40 + bits + 2 * sym + (group or 7) + actorder, cols=320, dtype=F64)
    r = fp.gptq_layer(W, H, bits, group, sym, actorder, "static", backend="torch")
    ref = llmcompressor_quantize_weight(W, H, bits, group, sym, actorder)
    what = f"static int{bits} sym={sym} g={group} a={actorder}"
    assert_same_quant(r, *ref, what, W, H, actorder)


def test_static_params_float32():
    W, H = _layer(41, rows=96, cols=320, dead=2)  # dead columns: grids from W as given
    r = fp.gptq_layer(W, H, 4, 128, False, False, "static", backend="torch")
    ref = llmcompressor_quantize_weight(W, H, 4, 128, False, False)
    assert_same_quant(r, *ref, "static float32", W, H)


def test_sparsegpt_wbits_equals_the_joint_sweep():
    """SparseGPT's `--wbits 4`: the asymmetric per-channel grid found once from W (before
    dead columns are zeroed), the mask chosen as without quantization, every weight rounded
    after pruning (a pruned one to exactly 0): same mask and weights."""
    for dtype in (F64, torch.float32):
        W, H = _layer(7, rows=64, cols=384, dtype=dtype, dead=3)
        spec = QuantSpec(bits=4, group_size=None, params="static", sym=False)
        for n, m in [(0, 0), (2, 4)]:
            r = fp.sparsegpt_layer(W, H, 0.5, n, m, quant=spec, backend="torch")
            Wref, pruned = original_sparsegpt(W, H, 0.5, n, m, wbits=4, dtype=dtype)
            what = f"--wbits 4 {n}:{m} {dtype}"
            scale, zero = original_find_params(W.clone(), 4, sym=False)
            g = torch.zeros(W.shape[1], dtype=torch.long)
            _, n_bad = assert_same_quant(r, Wref, scale, zero, g, what, W, H)
            # a row that took another path after a near-tie may prune differently after it
            assert (r.mask != ~pruned).any(1).sum() <= n_bad, what
            assert (r.weight[~r.mask] == 0).all()
            assert (r.quant.codes[~r.mask].int() == r.quant.zero.expand_as(W)[~r.mask]).all()


@pytest.mark.parametrize(
    "solve",
    [
        lambda W, H, q: fp.gptq_layer(W, H, 3, 64, False, True),
        lambda W, H, q: fp.sparsegpt_layer(W, H, 0.5, quant=q),
        lambda W, H, q: fp.sparsegpt_layer(W, H, 0.5, 4, 8, quant=q),
        lambda W, H, q: fp.rose_layer(W, H, 0.5, 2, 4, quant=q),
        lambda W, H, q: fp.rose_layer(W, H, 0.5, quant=q),
        lambda W, H, q: fp.compose_layer(W, H, 0.5, select="wanda", quant=q),
        lambda W, H, q: fp.fastprune_layer(W, H, 0.5, 2, 4, quant=q),
        lambda W, H, q: fp.fastprune_layer(W, H, 0.5, quant="fp8"),
    ],
    ids=["gptq", "sparsegpt", "sparsegpt 4:8", "rose 2:4", "rose", "wanda", "recipe", "fp8"],
)
def test_quantized_results(solve):
    """Every quantized solve: r.weight is the dequantized weight, the loss is tr(D H D^T) of
    it, pruned weights are exactly 0 and the pattern holds."""
    W, H = _layer(11, rows=32, cols=192, columnar=True)
    r = solve(W, H, QuantSpec(bits=4, group_size=64, sym=False))
    assert r.quant is not None and "quant" in r.info
    deq = r.quant.dequantize()
    assert torch.equal(deq, r.weight)
    assert (deq[~r.mask] == 0).all()
    want = fp.layer_loss(W, deq, H)
    assert abs(r.loss - want) <= 1e-4 * want
    if r.info["pattern"] != "unstructured":
        assert fp.check_nm_keep_mask(r.mask, *map(int, r.info["pattern"].split(":")))
    assert r.quant.nbytes() < W.numel() * 2  # fewer bytes than float16


def test_identity_hessian_is_round_to_nearest():
    """With H = I there is no error to spread: GPTQ is RTN."""
    W, _ = _layer(5, rows=16, cols=128)
    spec = QuantSpec(bits=4, group_size=32, sym=False)
    r = fp.gptq_layer(W, torch.eye(128), 4, 32, False)
    rtn = round_to_nearest(W, spec)
    assert torch.equal(r.quant.codes, rtn.codes) and torch.equal(r.quant.scale, rtn.scale)


def test_rescaled_layer_has_the_same_codes():
    """A layer far outside float32's comfortable range is solved exactly rescaled by powers
    of two: the same codes and zero points, the scales times the same power of two."""
    W, H = _layer(9, rows=16, cols=96)
    for spec in (QuantSpec(bits=4, group_size=32), QuantSpec(bits=4, group_size=None)):
        a = fp.sparsegpt_layer(W, H, 0.5, quant=spec)
        b = fp.sparsegpt_layer(W * 2.0**100, H * 2.0**-80, 0.5, quant=spec)
        assert "rescaled" in b.info
        assert torch.equal(a.quant.codes, b.quant.codes)
        assert torch.equal(a.quant.zero, b.quant.zero)
        assert torch.equal(a.quant.scale * 2.0**100, b.quant.scale)
        assert torch.equal(b.quant.dequantize(), b.weight)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, None])
def test_gptq_layer_keeps_the_zeros_of_a_pruned_layer(sym, group):
    """`mask=`: GPTQ of a pruned layer. Weights outside the mask stay zero; each kept one is
    its pre-rounding value (recovered from the result, float64) rounded to its grid, so the
    rounding errors went to the kept weights only. Plain GPTQ fills some zeros in."""
    W, H = _layer(5 + sym + (group or 3), rows=32, cols=160, dtype=F64)
    Wp = fp.sparsegpt_layer(W, H, 0.5, backend="torch").weight
    keep = Wp != 0
    r = fp.gptq_layer(Wp, H, 4, group, sym, mask=keep, backend="torch")
    assert torch.equal(r.mask, keep) and (r.weight[~keep] == 0).all()
    pre = pre_rounding(Wp, H, r.weight)
    g = r.quant.groups()
    scale, zero = r.quant.scale.double()[:, g], r.quant.zero.double()[:, g]
    codes = (torch.round(pre / scale) + zero).clamp(0, 15)
    near = ((pre / scale - (pre / scale).floor()) - 0.5).abs() <= TIE[F64]
    differ = (codes != r.quant.codes.double()) & keep
    bad = (differ & ~near).nonzero().tolist()
    assert not bad, f"{len(bad)} kept weights off their grid rounding, first at {bad[:5]}"
    plain = fp.gptq_layer(Wp, H, 4, group, sym, backend="torch")
    assert (plain.weight[~keep] != 0).any()
    assert r.loss > plain.loss  # fewer weights absorb the errors
    full = fp.gptq_layer(Wp, H, 4, group, sym, mask=torch.ones_like(keep), backend="torch")
    assert torch.equal(full.weight, plain.weight) and torch.equal(
        full.quant.codes, plain.quant.codes
    )


def test_gptq_method_keep_zeros_in_the_pipeline():
    """Method "gptq" with keep_zeros on a pruned model: the sparsity stays exactly; without
    it a warning says the zeros fill in."""
    from tests.pipeline_helpers import calib_ids, tiny_model

    model = tiny_model("llama")
    fp.prune_model(model, calib_ids(), method="sparsegpt", sparsity=0.5, progress=False)
    zeros = {n: p == 0 for n, p in model.named_parameters() if "layers" in n and p.dim() == 2}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rep = fp.prune_model(
        model, calib_ids(), method="gptq", sparsity=0.0, quant="w4a16", keep_zeros=True,
        progress=False,
    )  # fmt: skip
    assert rep.quantized
    for n, p in model.named_parameters():
        if n in zeros:
            assert (p[zeros[n]] == 0).all(), n
    model.load_state_dict(state)
    with pytest.raises(ValueError, match=r"asymmetric=True.*\(keep_zeros\)"):
        fp.prune_model(model, calib_ids(), method="gptq", sparsity=0.0, quant="w4a16",
                       keep_zeros=True, asymmetric=True, progress=False)  # fmt: skip
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="keep_zeros"):
        fp.prune_model(model, calib_ids(), method="gptq", sparsity=0.0, quant="w4a16",
                       progress=False)  # fmt: skip


def test_bad_arguments_are_named():
    W, H = _layer(1, rows=8, cols=64)
    with pytest.raises(ValueError, match="bits"):
        fp.gptq_layer(W, H, bits=9)
    with pytest.raises(ValueError, match="group_size"):
        fp.gptq_layer(W, H, group_size=0)
    with pytest.raises(ValueError, match="params"):
        fp.gptq_layer(W, H, params="mse")
    with pytest.raises(TypeError, match="sym"):
        fp.gptq_layer(W, H, sym="yes")
    with pytest.raises(TypeError, match="quant"):
        fp.sparsegpt_layer(W, H, 0.5, quant=4)
    with pytest.raises(ValueError, match="quant preset"):
        fp.sparsegpt_layer(W, H, 0.5, quant="w4")
    with pytest.raises(ValueError, match="group_size=6 must be a multiple of prune_m=4"):
        fp.sparsegpt_layer(W, H, 0.5, 2, 4, quant=QuantSpec(group_size=6))
    with pytest.raises(ValueError, match="quant.actorder"):
        fp.rose_layer(W, H, 0.5, quant=QuantSpec(actorder=True))
    with pytest.raises(ValueError, match="sparsity must be 0"):
        fp.METHODS["gptq"].solver(W, H, 0.5)
    with pytest.raises(ValueError, match="W"):
        fp.gptq_layer(W[0], H)
    with pytest.raises(ValueError, match="mask"):
        fp.gptq_layer(W, H, mask=torch.ones(8, 63, dtype=torch.bool))
    with pytest.raises(TypeError, match="keep_zeros"):
        fp.METHODS["gptq"].solver(W, H, 0.0, keep_zeros="yes")


def test_gptq_method_is_registered():
    m = fp.METHODS["gptq"]
    W, H = _layer(2, rows=8, cols=64)
    r = m.solver(W, H, 0.0, quant="w8a16")
    assert r.info["method"] == "gptq" and r.quant.spec == QuantSpec.preset("w8a16")
    assert "gptq_layer" in fp.__all__ and fp.solvers.gptq_layer is fp.gptq_layer
