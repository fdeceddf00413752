"""The `quant` option of `obs_sweep` in the Triton and CUDA kernels, beyond the shared matrix
against the float64 oracle (tests/ops/test_obs_sweep_quant.py): rounding to the bit (with
Hinv = I nothing is updated, so q is `fastprune.quant`'s rounding of the masked weights and a
grid found in the sweep is `find_params` of the group, exactly), torch's float8 e4m3 cast and
round-half-to-even over dense values, awkward inputs (forced N:M entries with found grids,
float64, strided inputs and grids, a partial last group, the widest CUDA block, a batch of
one) and the declarations dispatch reads.

The kernels round with plain IEEE arithmetic (no float8 cast: Triton's interpreter does not
round it to nearest even, and sm_80 has none), so the interpreter and the emulator run the
same arithmetic as a GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_PROBLEM, LAYER_RTOL, TRITON_PROBLEM, assert_close, backend_params
from op_oracles import check_obs_sweep, random_keep, sweep_block

import fastprune as fp
from fastprune.ops import Kernels, QuantBlock
from fastprune.ops.dispatch import backend_quant
from fastprune.ops.obs_sweep import ObsSweep, torch_obs_sweep
from fastprune.quant import QuantSpec, find_grids, has_fp8, quantize
from fastprune.testing import random_layer

BACKENDS = backend_params("obs_sweep")
FAST = backend_params("obs_sweep", fast_only=True)
GRIDS = ("int2 sym", "int3 asym", "int4 sym", "int4 asym", "int8 sym", "int8 asym", "fp8")


def _spec(grid: str, group_size: int) -> QuantSpec:
    """The grid's spec: int with groups of `group_size`, fp8 per channel."""
    if grid == "fp8":
        if not has_fp8():
            pytest.skip("torch without float8_e4m3fn")
        return QuantSpec.preset("fp8")
    bits, sym = grid.split()
    return QuantSpec(bits=int(bits[3:]), sym=sym == "sym", group_size=group_size)


def _block(W1, spec: QuantSpec, find: bool, from_W=None) -> QuantBlock:
    """The block's grids found from `from_W` (default W1) per the spec's groups (fp8: per
    channel); with `find` the given grids are zeros the sweep overwrites."""
    scale, zero = find_grids((W1 if from_W is None else from_W).float(), spec)
    if find:
        scale, zero = torch.zeros_like(scale), torch.zeros_like(zero)
    gs = spec.group_size or W1.shape[-1]
    return QuantBlock(spec.maxq, spec.sym, spec.fp8, gs, scale, zero, find)


def _sweep(backend, W1, Hinv1, keep1, n, m, qb) -> ObsSweep:
    """The backend's own kernel (never a fallback) on copies; inputs are not modified."""
    dev = backend.device
    args = [W1.to(dev, copy=True), Hinv1.to(dev, copy=True)]
    args.append(None if keep1 is None else keep1.to(dev, copy=True))
    qd = qb._replace(scale=qb.scale.to(dev, copy=True), zero=qb.zero.to(dev, copy=True))
    out = backend.op("obs_sweep")(*args, n, m, quant=qd)
    for a, b in zip([*args, qd.scale, qd.zero], (W1, Hinv1, keep1, qb.scale, qb.zero)):
        assert a is None or torch.equal(a.cpu(), b), "inputs are not modified"
    out = out if isinstance(out, ObsSweep) else ObsSweep(*out)
    return ObsSweep(*(t.cpu() for t in out), out.scale.cpu(), out.zero.cpu())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("find", [False, True], ids=["static", "found"])
@pytest.mark.parametrize("pattern", ["fixed", "2:4"])
def test_identity_hessian_rounds_exactly(backend, gen, grid, find, pattern):
    """Hinv = I: q is the masked weight rounded to its group's grid, err = w - q, and a grid
    found in the sweep is find_params of the group's weights, all to the bit. Static grids
    are fitted to 1.5 W, so they differ from the found ones."""
    rows, count, gs = 13, 48, 16
    spec = _spec(grid, gs)
    W1 = torch.randn(rows, count, generator=gen)
    W1[3] = 0  # an all-zero row: grid [-1, 1] (fp8: scale 1)
    n, m = (2, 4) if pattern == "2:4" else (0, 0)
    keep1 = random_keep(gen, rows, count) if not n else None
    qb = _block(W1, spec, find, from_W=None if find else 1.5 * W1)
    out = _sweep(backend, W1, torch.eye(count), keep1, n, m, qb)
    keep = torch_obs_sweep(W1, torch.eye(count), keep1, n, m).keep  # the magnitude mask
    assert torch.equal(out.keep, keep)
    scale, zero = find_grids(W1, spec) if find else (qb.scale, qb.zero)
    assert torch.equal(out.scale, scale) and torch.equal(out.zero, zero)
    g = torch.arange(count) // qb.group_size
    want = quantize(W1 * keep, scale[:, g], zero[:, g], spec)
    assert torch.equal(out.q, want)
    assert torch.equal(out.err, W1 - want)
    assert_close(out.loss_rows, (want - W1).pow(2).sum(1) / 2, rtol=1e-6, what="loss_rows")
    assert not out.q[~keep].any(), "a pruned weight is exactly 0"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_fp8_rounding_is_torchs_cast(backend):
    """Every float8 e4m3 midpoint and its float32 neighbours, both signs, subnormals, the
    saturation at 448 and values far beyond it: with scale 1 and Hinv = I, q is torch's
    float8_e4m3fn cast of the clamped weight, bit for bit."""
    if not has_fp8():
        pytest.skip("torch without float8_e4m3fn")
    levels = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (levels[:-1] + levels[1:]) / 2  # exact in float32
    up, down = (torch.nextafter(mids, torch.tensor(v)) for v in (1e9, -1e9))
    special = torch.tensor([0.0, 2.0**-10, 2.0**-9, 3 * 2.0**-11, 447.0, 448.0, 460.0, 464.0])
    special = torch.cat([special, torch.tensor([479.0, 480.0, 1e4, 1e12, 1e-30, 2.0**-6])])
    x = torch.cat([levels, mids, up, down, special])
    x = torch.cat([x, -x, torch.logspace(-12, 10, 122, base=2.0)])
    count = 64
    W1 = torch.cat([x, torch.zeros(-x.numel() % count)]).reshape(-1, count)
    rows = W1.shape[0]
    ones = torch.ones(rows, 1)
    qb = QuantBlock(255, True, True, count, ones, torch.zeros(rows, 1), False)
    keep = torch.ones(rows, count, dtype=torch.bool)
    out = _sweep(backend, W1, torch.eye(count), keep, 0, 0, qb)
    want = W1.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    bad = (out.q != want).nonzero()[:5].tolist()
    assert not bad, [(W1[r, c].item(), out.q[r, c].item(), want[r, c].item()) for r, c in bad]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_int_rounding_is_half_to_even(backend, sym):
    """Weights exactly half-way between two levels round to the even one (torch.round), and
    weights beyond the grid clamp to its ends."""
    count = 32
    W1 = (torch.arange(-64, 64, dtype=torch.float32) / 2).reshape(4, count)
    maxq, zero = 15, 8.0 if sym else 3.0
    qb = QuantBlock(maxq, sym, False, count, torch.ones(4, 1), torch.full((4, 1), zero), False)
    keep = torch.ones(4, count, dtype=torch.bool)
    out = _sweep(backend, W1, torch.eye(count), keep, 0, 0, qb)
    want = torch.clamp(torch.round(W1) + zero, 0, maxq) - zero
    assert torch.equal(out.q, want)
    at = {w: out.q.flatten()[int(2 * w) + 64].item() for w in (-2.5, -1.5, -0.5, 0.5, 1.5, 2.5)}
    assert at == {-2.5: -2.0, -1.5: -2.0, -0.5: 0.0, 0.5: 0.0, 1.5: 2.0, 2.5: 2.0}, "to even"


def _forced(gen, shape):
    return torch.rand(shape, generator=gen) >= 0.3


# rows, count, group size, find, pattern, H kind: what the shared matrix leaves out
CASES = [
    (19, 64, 16, True, "2:4 forced", "plain"),  # forced entries with found grids
    (19, 64, 8, True, "4:8 forced", "columnar"),  # a group of one N:M group
    (8, 256, 128, True, "unstructured", "columnar"),  # the widest block CUDA takes
    (8, 256, 64, False, "4:8", "ill"),
    (37, 40, 16, True, "fixed", "plain"),  # a last partial group of 8
    (3, 17, 17, True, "fixed", "plain"),  # a prime count, one group
    (33, 32, 32, False, "2:4", "plain"),  # 33: a warp and one row
]


def _keep_for(gen, W1, pattern):
    if pattern == "unstructured":
        from op_oracles import oracle_block_prune_mask

        return None, oracle_block_prune_mask(W1, torch.ones(W1.shape[1]), 0.5)[0]
    if pattern == "fixed":
        return None, random_keep(gen, *W1.shape, p_keep=0.4)
    n, m = (int(v) for v in pattern.split()[0].split(":"))
    return (n, m), (_forced(gen, W1.shape) if pattern.endswith("forced") else None)


@pytest.mark.parametrize("backend", FAST, indirect=True)
@pytest.mark.parametrize("grid", ["int3 asym", "int4 sym", "int8 asym"])
@pytest.mark.parametrize("rows,count,gs,find,pattern,kind", CASES)
def test_quant_kernel_cases(backend, gen, grid, rows, count, gs, find, pattern, kind):
    """The kernels against the float64 oracle on the awkward cases above."""
    spec = _spec(grid, gs)
    W1, Hinv1 = sweep_block(gen, rows, count, kind)
    nm, keep1 = _keep_for(gen, W1, pattern)
    n, m = nm or (0, 0)
    qb = _block(W1, spec, find)
    out = _sweep(backend, W1, Hinv1, keep1, n, m, qb)
    check_obs_sweep(out, W1, Hinv1, keep1, n, m, f"{backend.name} {grid}", quant=qb)


@pytest.mark.parametrize("backend", FAST, indirect=True)
@pytest.mark.parametrize("grid", ["int4 asym", "fp8"])
def test_quant_strided_inputs_and_grids(backend, gen, grid):
    """W1 column-major, Hinv1 a strided block, keep1 and the grids transposed views: read
    in place, the same result as contiguous inputs, to the bit."""
    spec = _spec(grid, 16)
    W1, Hinv1 = sweep_block(gen, 21, 64, "plain")
    keep1 = random_keep(gen, 21, 64)
    qb = _block(W1, spec, False)
    strided = qb._replace(scale=qb.scale.t().contiguous().t(), zero=qb.zero.t().contiguous().t())
    W1t, k1t = W1.t().contiguous().t(), keep1.t().contiguous().t()
    a = _sweep(backend, W1t, Hinv1, k1t, 0, 0, strided)
    b = _sweep(backend, W1, Hinv1.contiguous(), keep1, 0, 0, qb)
    for x, y in zip((*a, a.scale, a.zero), (*b, b.scale, b.zero)):
        assert torch.equal(x, y)
    check_obs_sweep(a, W1, Hinv1, keep1, 0, 0, f"{backend.name} strided", quant=qb)


@pytest.mark.parametrize(
    "backend", [p for p in FAST if p.id == "triton"], indirect=True
)  # CUDA: float32 only (falls back, see test_cuda_float64_quant_falls_back)
@pytest.mark.parametrize("grid", ["int4 asym", "fp8"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_quant_float64(backend, gen, grid, pattern):
    """float64 inputs sweep and round in float64 (fp8 through float32, as torch casts)."""
    spec = _spec(grid, 16)
    W1, Hinv1 = sweep_block(gen, 11, 48, "ill", dtype=torch.float64)
    Hinv1 = Hinv1.double()
    nm, keep1 = _keep_for(gen, W1, pattern)
    n, m = nm or (0, 0)
    qb = _block(W1, spec, not spec.fp8)
    qb = qb._replace(scale=qb.scale.double(), zero=qb.zero.double())
    out = _sweep(backend, W1, Hinv1, keep1, n, m, qb)
    assert out.q.dtype == out.scale.dtype == torch.float64
    check_obs_sweep(out, W1, Hinv1, keep1, n, m, f"{backend.name} float64", quant=qb)


@pytest.mark.parametrize("backend", FAST, indirect=True)
@pytest.mark.parametrize("grid", ["int4 sym", "fp8"])
@pytest.mark.parametrize("pattern", ["fixed", "2:4 forced"])
def test_quant_batch_of_one_is_the_layer(backend, gen, grid, pattern):
    """The batched form with E = 1 gives the one-layer output, grids included, bit for bit;
    a batch of several equals each layer alone."""
    spec = _spec(grid, 16)
    blocks = [sweep_block(gen, 9, 48, k) for k in ("plain", "ill", "columnar")]
    W1 = torch.stack([w for w, _ in blocks])
    Hinv1 = torch.stack([h for _, h in blocks])
    nm, _ = _keep_for(gen, W1[0], pattern)
    n, m = nm or (0, 0)
    keep1 = _forced(gen, W1.shape) if pattern.endswith("forced") else random_keep(gen, 27, 48)
    keep1 = keep1.reshape(W1.shape)
    qb = _block(W1, spec, not spec.fp8)
    batch = _sweep(backend, W1, Hinv1, keep1, n, m, qb)
    for e in range(3):
        qe = qb._replace(scale=qb.scale[e], zero=qb.zero[e])
        alone = _sweep(backend, W1[e], Hinv1[e], keep1[e], n, m, qe)
        for x, y in zip((*batch, batch.scale, batch.zero), (*alone, alone.scale, alone.zero)):
            assert torch.equal(x[e], y), f"layer {e}"
    one = _sweep(
        backend,
        W1[:1],
        Hinv1[:1],
        keep1[:1],
        n,
        m,
        qb._replace(scale=qb.scale[:1], zero=qb.zero[:1]),
    )
    assert all(torch.equal(x[0], y[0]) for x, y in zip(one, batch))


@pytest.mark.parametrize("backend", FAST, indirect=True)
def test_quant_bad_grids_are_refused(backend, gen):
    W1, Hinv1 = sweep_block(gen, 4, 32, "plain")
    keep1 = torch.ones(4, 32, dtype=torch.bool)
    qb = _block(W1, QuantSpec(bits=4, group_size=16), False)
    sweep = backend.op("obs_sweep")
    dev = backend.device
    args = (W1.to(dev), Hinv1.to(dev), keep1.to(dev), 0, 0)
    bad = qb._replace(scale=qb.scale[:, :1].to(dev), zero=qb.zero[:, :1].to(dev))
    with pytest.raises((ValueError, RuntimeError), match="scale"):
        sweep(*args, quant=bad)
    bad = qb._replace(group_size=0, scale=qb.scale.to(dev), zero=qb.zero.to(dev))
    with pytest.raises((ValueError, RuntimeError), match="group_size"):
        sweep(*args, quant=bad)


def test_fast_backends_declare_quant():
    """Dispatch reads `QUANT`: the Triton and CUDA kernels take the option, with the limits
    they have without it (CUDA: float32, blocks of at most 256 columns)."""
    from fastprune.ops import cuda_ops

    if TRITON_PROBLEM is None:
        assert "obs_sweep" in backend_quant("triton")
    assert "obs_sweep" in cuda_ops.QUANT
    qb = QuantBlock(15, True, False, 16, torch.ones(4, 2), torch.zeros(4, 2), True)
    why = cuda_ops.cuda_obs_sweep_unsupported
    assert why(torch.zeros(4, 32), torch.eye(32), None, 2, 4, quant=qb) is None
    assert why(torch.zeros(4, 32).double(), torch.eye(32), None, 2, 4, quant=qb).startswith(
        "float32 only"
    )


@pytest.mark.skipif(
    TRITON_PROBLEM is not None or CUDA_PROBLEM is not None, reason="needs Triton and CUDA"
)
def test_cuda_float64_quant_falls_back(gen, monkeypatch):
    """CUDA takes float32 only, with quant as without: a float64 quantized sweep named on
    cuda runs Triton's kernel, and says why."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("FASTPRUNE_CUDA_EMULATE", "1")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    W1, Hinv1 = sweep_block(gen, 6, 32, "plain", dtype=torch.float64)
    keep1 = torch.ones(6, 32, dtype=torch.bool)
    qb = _block(W1, QuantSpec(bits=4, group_size=16), True)
    k = Kernels("cuda", dev, ("obs_sweep",))
    out = k("obs_sweep", W1.to(dev), Hinv1.double().to(dev), keep1.to(dev), 0, 0, quant=qb)
    assert k.info()["kernels"]["obs_sweep"] == "triton"
    assert k.info()["kernel_fallbacks"]["obs_sweep"].startswith("cuda: float32 only")
    assert out.scale is not None and out.scale.dtype == torch.float64


@pytest.mark.parametrize("backend", FAST, indirect=True)
@pytest.mark.parametrize(
    "solve",
    [
        lambda W, H, b: fp.gptq_layer(W, H, 4, 32, True, blocksize=64, backend=b),
        lambda W, H, b: fp.gptq_layer(W, H, 3, 64, False, True, blocksize=64, backend=b),
        lambda W, H, b: fp.gptq_layer(W, H, 8, None, False, params="static", backend=b),
        lambda W, H, b: fp.sparsegpt_layer(W, H, 0.5, 2, 4, quant="w4a16", backend=b),
        lambda W, H, b: fp.sparsegpt_layer(W, H, 0.5, quant="fp8", blocksize=32, backend=b),
    ],
    ids=["gptq g32", "gptq g64 asym actorder", "gptq int8 static", "sparsegpt 2:4 w4a16", "fp8"],
)
def test_quantized_solves_run_the_kernel(backend, gen, solve):
    """A quantized solve on a fast backend runs its own kernel for every block (no fallback)
    and gives the torch backend's weights, but in the rows where float rounding met a
    rounding or mask near-tie (rows are independent: a flip changes the rest of its row
    only; a few rows of 48 at most), and its loss up to those rows."""
    W, H = random_layer(48, 160, generator=gen, device=str(backend.device))[:2]
    ref = solve(W, H, "torch")
    r = solve(W, H, backend.name)
    assert r.info["kernels"]["obs_sweep"] == backend.name
    assert "kernel_fallbacks" not in r.info
    far = ((r.weight - ref.weight).abs() > LAYER_RTOL * ref.weight.abs().max()).any(1)
    assert far.sum() <= 4, f"rows {far.nonzero().flatten().tolist()} differ"
    assert r.loss == pytest.approx(ref.loss, rel=1e-2)
