"""Op `obs_sweep` with its `quant` option (kept weights rounded to a grid in the sweep) on
every backend that declares the option, against the float64 oracle (`op_oracles`).

Grids: per output channel (static, one group for the block), static groups, and groups
whose grid the sweep finds from the updated weights at their first column; int 2/3/4/8 bits
symmetric and asymmetric, and fp8. A float32 backend may round a weight to the other of two
levels only where it lies half-way between them within float32 rounding (a near-tie, as for
masks): the oracle follows the backend's rounding there and checks it is one. A backend that
does not declare the option is passed over by dispatch for the next of its chain, which says
so; the others are checked here directly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params
from op_oracles import PATTERNS, check_obs_sweep, oracle_block_prune_mask, random_keep, sweep_block

from fastprune.ops import Kernels, QuantBlock
from fastprune.ops.dispatch import backend_quant
from fastprune.ops.obs_sweep import torch_obs_sweep
from fastprune.quant import QuantSpec, find_grids, has_fp8

BACKENDS = backend_params("obs_sweep")
GRIDS = ("int4 sym", "int4 asym", "int2 asym", "int3 sym", "int8 asym", "int8 sym", "fp8")


def _spec(grid: str) -> QuantSpec:
    if grid == "fp8":
        if not has_fp8():
            pytest.skip("torch without float8_e4m3fn")
        return QuantSpec.preset("fp8")
    bits, sym = grid.split()
    return QuantSpec(bits=int(bits[3:]), sym=sym == "sym", group_size=None)


def quant_block(W1, spec: QuantSpec, group_size: int | None, find: bool) -> QuantBlock:
    """The block's `QuantBlock`: groups of `group_size` columns (None: one for the block),
    their grids found from `W1` (static) or left for the sweep to find (zeros)."""
    count = W1.shape[-1]
    gs = group_size or count
    scale, zero = find_grids(W1.float(), QuantSpec(bits=spec.bits, sym=spec.sym, group_size=gs))
    if spec.fp8:
        scale, zero = find_grids(W1.float(), spec)
    if find:
        scale, zero = torch.zeros_like(scale), torch.zeros_like(zero)
    return QuantBlock(spec.maxq, spec.sym, spec.fp8, gs, scale, zero, find)


def _keep1(gen, W1, Hinv1, pattern):
    if pattern == "unstructured":
        if W1.dim() == 3:
            return torch.stack([_keep1(gen, w, h, pattern) for w, h in zip(W1, Hinv1)])
        return oracle_block_prune_mask(W1, Hinv1.diagonal(), 0.5)[0]
    if pattern == "fixed":
        return random_keep(gen, W1.shape[-2] * W1[..., 0, 0].numel(), W1.shape[-1]).reshape(
            W1.shape
        )
    return None


def _run(backend, W1, Hinv1, keep1, n, m, qb):
    dev = backend.device
    args = [W1.to(dev, copy=True), Hinv1.to(dev, copy=True)]
    args.append(None if keep1 is None else keep1.to(dev, copy=True))
    qd = qb._replace(scale=qb.scale.to(dev, copy=True), zero=qb.zero.to(dev, copy=True))
    k = Kernels(backend.name, dev, ("obs_sweep",))
    out = k("obs_sweep", *args, n, m, quant=qd)
    ran = k.info()["kernels"]["obs_sweep"]
    if "obs_sweep" in backend_quant(backend.name):
        assert ran == backend.name
    else:
        assert ran != backend.name
        assert k.info()["kernel_fallbacks"]["obs_sweep"] == f"{backend.name}: no quant option"
    for a, b in zip(args, (W1, Hinv1, keep1)):
        assert a is None or torch.equal(a.cpu(), b), "inputs are not modified"
    assert torch.equal(qd.scale.cpu(), qb.scale), "quant.scale is not modified"
    return out


CASES = [
    # rows, count, group_size (None: per channel), find, patterns
    (1, 32, None, False, ("unstructured", "2:4", "fixed")),  # one row, per channel
    (37, 64, 16, True, ("unstructured", "2:4", "4:8", "fixed")),  # found in the sweep
    (37, 64, 32, False, ("unstructured", "4:8")),  # static groups
    (5, 100, 32, True, ("unstructured",)),  # a last partial group (100 = 3*32 + 4)
    (6, 100, 20, True, ("unstructured", "2:4")),  # groups across the torch sub-blocks
    (3, 17, 8, True, ("fixed",)),  # a prime count
    (16, 128, 128, True, ("unstructured", "2:4")),  # the block is one group
    (130, 48, None, False, ("2:4",)),  # many rows
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize(
    "rows,count,gs,find,pattern",
    [(r, c, g, f, p) for r, c, g, f, ps in CASES for p in ps],
)
def test_obs_sweep_quant(backend, gen, grid, rows, count, gs, find, pattern):
    spec = _spec(grid)
    if spec.fp8 and gs is not None:
        gs, find = None, False  # fp8 grids are per channel
    n, m = PATTERNS[pattern]
    W1, Hinv1 = sweep_block(gen, rows, count, "ill" if count == 128 else "plain")
    keep1 = _keep1(gen, W1, Hinv1, pattern)
    qb = quant_block(W1, spec, gs, find)
    out = _run(backend, W1, Hinv1, keep1, n, m, qb)
    check_obs_sweep(out, W1, Hinv1, keep1, n, m, f"{backend.name} {grid}", quant=qb)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("grid", ("int4 asym", "int3 sym", "fp8"))
@pytest.mark.parametrize("pattern", ("unstructured", "2:4", "fixed"))
def test_obs_sweep_quant_batched(backend, gen, grid, pattern):
    """`W1 [E, rows, count]` with per-layer grids `[E, rows, G]`: each layer against the
    oracle of its own block and grid."""
    spec = _spec(grid)
    rows, count = 7, 48
    gs, find = (None, False) if spec.fp8 else (16, True)
    blocks = [sweep_block(gen, rows, count, k) for k in ("plain", "ill", "columnar")]
    W1 = torch.stack([w for w, _ in blocks])
    Hinv1 = torch.stack([h for _, h in blocks])
    W1[0, :, 5] = 0
    n, m = PATTERNS[pattern]
    keep1 = _keep1(gen, W1, Hinv1, pattern)
    qb = quant_block(W1, spec, gs, find)
    out = _run(backend, W1, Hinv1, keep1, n, m, qb)
    check_obs_sweep(out, W1, Hinv1, keep1, n, m, f"{backend.name} batched", quant=qb)


def test_quant_rounds_kept_weights_and_zero_stays_zero(gen):
    """With Hinv = I there are no updates: q is the masked weight rounded to the static
    grid (RTN), exactly; pruned weights are exactly 0; err is w - q."""
    W1 = torch.randn(9, 32, generator=gen)
    keep1 = random_keep(gen, 9, 32)
    spec = QuantSpec(bits=4, sym=False, group_size=8)
    qb = quant_block(W1, spec, 8, False)
    out = torch_obs_sweep(W1, torch.eye(32), keep1, 0, 0, quant=qb)
    g = torch.arange(32) // 8
    s, z = qb.scale[:, g], qb.zero[:, g]
    want = s * (torch.clamp(torch.round(W1 * keep1 / s) + z, 0, 15) - z)
    assert torch.equal(out.q, want)
    assert torch.equal(out.err, W1 - want)
    assert (out.q[~keep1] == 0).all()


def test_found_grid_is_the_updated_group(gen):
    """A grid found in the sweep is GPTQ's find_params of the group's columns as updated by
    every earlier column (also those of earlier sub-blocks), e.g. the second group's."""
    W1, Hinv1 = sweep_block(gen, 6, 40, "plain")
    spec = QuantSpec(bits=4, sym=True, group_size=None)
    qb = quant_block(W1, spec, 20, True)
    keep = torch.ones(6, 40, dtype=torch.bool)
    out = torch_obs_sweep(W1, Hinv1, keep, 0, 0, inner=16, quant=qb)
    # the second group's columns after the first group's updates (its errors out.err)
    upd = W1[:, 20:].double() - out.err[:, :20].double() @ Hinv1[:20, 20:].double()
    s_ref = upd.abs().amax(1) / 7.5
    assert torch.allclose(out.scale[:, 1].double(), s_ref, rtol=1e-5)


def test_bad_quant_blocks_are_refused(gen):
    W1, Hinv1 = sweep_block(gen, 4, 32, "plain")
    keep = torch.ones(4, 32, dtype=torch.bool)
    qb = quant_block(W1, QuantSpec(bits=4, group_size=None), 16, False)
    with pytest.raises(ValueError, match=r"quant.scale and quant.zero must be \[\(E,\) rows, 2\]"):
        torch_obs_sweep(W1, Hinv1, keep, quant=qb._replace(scale=qb.scale[:, :1]))
    with pytest.raises(ValueError, match="quant.group_size=6 must be a multiple of prune_m=4"):
        six = quant_block(W1, QuantSpec(bits=4, group_size=None), 6, True)
        torch_obs_sweep(W1, Hinv1, None, 2, 4, quant=six)


def test_without_quant_no_grids(gen):
    W1, Hinv1 = sweep_block(gen, 4, 16, "plain")
    out = torch_obs_sweep(W1, Hinv1, None, 2, 4)
    assert out.scale is None and out.zero is None and len(out) == 4


def test_check_catches_a_wrong_level(gen):
    """The oracle's check refuses a weight rounded to a level other than the nearest where
    the two are no near-tie, and a found grid that is not the updated group's."""
    W1, Hinv1 = sweep_block(gen, 5, 32, "plain")
    keep = torch.ones(5, 32, dtype=torch.bool)
    qb = quant_block(W1, QuantSpec(bits=4, sym=False, group_size=None), 16, True)
    out = torch_obs_sweep(W1, Hinv1, keep, 0, 0, quant=qb)
    check_obs_sweep(out, W1, Hinv1, keep, 0, 0, quant=qb)
    q = out.q.clone()
    x = W1[:, 0] / out.scale[:, 0]
    r = int((x - x.round()).abs().argmin())  # a weight near a level, far from a tie
    q[r, 0] += out.scale[r, 0]
    bad = type(out)(q, out.err, out.keep, out.loss_rows, out.scale, out.zero)
    with pytest.raises(AssertionError, match="column 0: rows .* the nearest level"):
        check_obs_sweep(bad, W1, Hinv1, keep, 0, 0, quant=qb)
    scale = out.scale.clone()
    scale[:, 1] *= 1.01
    bad = type(out)(out.q, out.err, out.keep, out.loss_rows, scale, out.zero)
    with pytest.raises(AssertionError, match="group 1: the grid found in the sweep"):
        check_obs_sweep(bad, W1, Hinv1, keep, 0, 0, quant=qb)
