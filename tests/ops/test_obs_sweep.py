"""Op `obs_sweep` on every backend (torch, Triton, CUDA) against its float64 oracle, the
research loop column by column (`op_oracles.oracle_obs_sweep`).

Each backend's own implementation is called (never a fallback). Inputs are seeded per test
(`gen`; FASTPRUNE_TEST_SEED=random draws fresh ones, see conftest). Masks: unstructured and
fixed masks are used exactly as given; N:M groups choose from the updated weights, so a
float32 backend may pick differently from the float64 oracle only at a near-tie: every group
is checked against the scores it saw along the backend's own path (docs/semantics.md,
Exactness), and the values against the oracle swept along that same mask. The batched form
(a leading layer dimension) runs through dispatch on each backend, each layer against the
oracle of its own block.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, backend_params
from op_oracles import (
    PATTERNS,
    check_obs_sweep,
    oracle_block_prune_mask,
    oracle_obs_sweep,
    random_keep,
    sweep_block,
)

from fastprune.masks import check_nm_keep_mask
from fastprune.ops import Kernels
from fastprune.ops.dispatch import backend_batched
from fastprune.ops.obs_sweep import torch_obs_sweep, torch_obs_sweep_batched

BACKENDS = backend_params("obs_sweep")
backends = pytest.mark.parametrize("backend", BACKENDS, indirect=True)

BASIC = ("unstructured", "fixed", "2:4", "4:8")
SWEEP_CASES = [
    # rows, count (one block), H kind, patterns ("forced": N:M with a keep1 forcing 30% of
    # entries pruned); N:M only where M divides count
    (1, 32, "plain", (*BASIC, "2:4 forced", "4:8 forced")),  # one row
    (37, 64, "columnar", (*BASIC, "2:4 forced", "4:8 forced")),  # 37: a partial warp
    (37, 4, "plain", ("unstructured", "fixed", "2:4", "2:4 forced")),  # one group
    (16, 128, "ill", (*BASIC, "2:4 forced")),
    (5, 100, "ill", ("unstructured", "fixed", "2:4", "2:4 forced")),  # 100: padded tile
    (8, 256, "columnar", (*BASIC, "4:8 forced")),  # the widest block the CUDA kernel takes
    (130, 128, "plain", ("unstructured", "2:4")),  # many row blocks
    (3, 17, "plain", ("unstructured", "fixed")),  # a prime
]


def _keep1(gen, W1, Hinv1, pattern):
    """The keep1 a case passes: the block's threshold mask, a random fixed mask, None (N:M)
    or, for 'forced', a random 30% of entries forced pruned."""
    if pattern == "unstructured":
        return oracle_block_prune_mask(W1, Hinv1.diagonal(), 0.5)[0]
    if pattern == "fixed":
        return random_keep(gen, *W1.shape, p_keep=0.4)
    if pattern.endswith("forced"):
        return torch.rand(W1.shape, generator=gen) >= 0.3
    return None


def _pattern(pattern):
    return PATTERNS[pattern.split()[0]]


@backends
@pytest.mark.parametrize(
    "rows,count,kind,pattern", [(r, c, k, p) for r, c, k, ps in SWEEP_CASES for p in ps]
)
def test_obs_sweep(backend, gen, rows, count, kind, pattern):
    n, m = _pattern(pattern)
    W1, Hinv1 = sweep_block(gen, rows, count, kind)
    keep1 = _keep1(gen, W1, Hinv1, pattern)
    dev = backend.device
    args = (W1.to(dev, copy=True), Hinv1.to(dev, copy=True))
    args += (None if keep1 is None else keep1.to(dev, copy=True),)
    out = backend.op("obs_sweep")(*args, n, m)
    check_obs_sweep(out, W1, Hinv1, keep1, n, m, what=f"{backend.name} obs_sweep")
    if n and keep1 is None:
        assert check_nm_keep_mask(out[2].cpu(), n, m)
    for a, b in zip(args, (W1, Hinv1, keep1)):
        assert a is None or torch.equal(a.cpu(), b), "inputs are not modified"


@backends
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_obs_sweep_forced_groups(backend, gen, n, m):
    """N:M with keep1: forced entries rank as score 0 and stay pruned, so a group prunes
    max(n, forced) of its entries: groups with fewer, exactly n and more forced than n."""
    rows, count = (6, 32)
    W1, Hinv1 = sweep_block(gen, rows, count, "plain")
    keep1 = torch.ones(rows, count, dtype=torch.bool)
    g = count // m
    for r in range(rows):  # row r forces (r + group) % (m + 1) entries of each group
        for j in range(g):
            f = (r + j) % (m + 1)
            cols = torch.randperm(m, generator=gen)[:f] + j * m
            keep1[r, cols] = False
    dev = backend.device
    out = backend.op("obs_sweep")(W1.to(dev), Hinv1.to(dev), keep1.to(dev), n, m)
    check_obs_sweep(out, W1, Hinv1, keep1, n, m, what=f"{backend.name} forced")
    forced = (~keep1).reshape(rows, g, m).sum(-1)
    pruned = (~out[2].cpu()).reshape(rows, g, m).sum(-1)
    assert torch.equal(pruned, forced.clamp_min(n)), "a group prunes max(n, forced)"


@backends
def test_obs_sweep_forced_with_zero_weights(backend):
    """A 2:4 group whose columns 0, 1 are zero (dead channels) and whose column 3 is forced
    pruned: the contract says the group prunes max(2, 1) = 2 entries."""
    W1 = torch.tensor([[0.0, 0.0, 1.0, 2.0]])
    keep1 = torch.tensor([[True, True, True, False]])
    dev = backend.device
    out = backend.op("obs_sweep")(W1.to(dev), torch.eye(4, device=dev), keep1.to(dev), 2, 4)
    assert int((~out[2]).sum()) == 2, f"pruned {(~out[2].cpu()).tolist()}"


@backends
@pytest.mark.parametrize("pattern", ["fixed", "2:4", "4:8 forced"])
def test_obs_sweep_strided_and_transposed_inputs(backend, gen, pattern):
    """W1 stored column-major, Hinv1 a strided block of a wider inverse, keep1 transposed:
    read in place, same result as contiguous inputs."""
    n, m = _pattern(pattern)
    W1, Hinv1 = sweep_block(gen, 19, 64, "plain")
    W1t = W1.t().contiguous().t()  # column-major
    assert W1t.stride() == (1, 19) and not Hinv1.is_contiguous()
    keep1 = _keep1(gen, W1, Hinv1, pattern)
    k = None if keep1 is None else keep1.t().contiguous().t()
    dev = backend.device
    out = backend.op("obs_sweep")(
        W1t.to(dev), Hinv1.to(dev), None if k is None else k.to(dev), n, m
    )
    check_obs_sweep(out, W1, Hinv1, keep1, n, m, what=f"{backend.name} strided")


@backends
@pytest.mark.parametrize("pattern", ["fixed", "2:4", "2:4 forced"])
def test_obs_sweep_degenerate_rows(backend, gen, pattern):
    """Rows with nothing pruned, everything pruned (fixed mask) or all-zero weights: no
    error where nothing is pruned, zeros for a zero row, the oracle's answer elsewhere."""
    n, m = _pattern(pattern)
    W1, Hinv1 = sweep_block(gen, 6, 64, "plain")
    W1 = W1.clone()
    W1[2] = 0
    keep1 = _keep1(gen, W1, Hinv1, pattern)
    if pattern == "fixed":
        keep1[0], keep1[1] = True, False
    dev = backend.device
    out = backend.op("obs_sweep")(
        W1.to(dev), Hinv1.to(dev), None if keep1 is None else keep1.to(dev), n, m
    )
    check_obs_sweep(out, W1, Hinv1, keep1, n, m, what=f"{backend.name} degenerate")
    q, err, _, loss = (t.cpu() for t in out)
    assert loss[2].item() == 0.0 and not q[2].any() and not err[2].any(), "all-zero row"
    if pattern == "fixed":
        assert loss[0].item() == 0.0 and not err[0].any(), "nothing pruned in row 0"
        assert not q[1].any(), "everything pruned in row 1"


@backends
def test_obs_sweep_identity_hessian_is_magnitude(backend, gen):
    """With Hinv = I there are no updates: q = W masked, err = the pruned weights, and the
    2:4 mask is the magnitude mask of each group, exactly."""
    W1 = torch.randn(13, 40, generator=gen)
    dev = backend.device
    q, err, keep, loss = (
        t.cpu() for t in backend.op("obs_sweep")(W1.to(dev), torch.eye(40, device=dev), None, 2, 4)
    )
    groups = W1.abs().reshape(13, 10, 4)
    kth = groups.sort(-1).values[..., 1:2]
    assert torch.equal(keep, (groups > kth).reshape(13, 40))
    assert torch.equal(q, W1 * keep) and torch.equal(err, W1 * ~keep)
    assert_close(loss, (W1 * ~keep).pow(2).sum(1) / 2, rtol=1e-6, what="loss_rows")


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        *backend_params("obs_sweep", fast_only=True)[:1],  # triton (CUDA: float32 only)
    ],
    indirect=True,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pattern", ["fixed", "2:4"])
def test_obs_sweep_half_inputs(backend, gen, dtype, pattern):
    """Half-precision W1 is swept in float32 (outputs float32)."""
    n, m = _pattern(pattern)
    W1, Hinv1 = sweep_block(gen, 19, 48, "plain", dtype=dtype)
    keep1 = _keep1(gen, W1, Hinv1, pattern)
    dev = backend.device
    out = backend.op("obs_sweep")(
        W1.to(dev), Hinv1.to(dev), None if keep1 is None else keep1.to(dev), n, m
    )
    check_obs_sweep(out, W1, Hinv1, keep1, n, m, what=f"{backend.name} {dtype}")


@pytest.mark.parametrize("backend", backend_params("obs_sweep")[:2], indirect=True)
@pytest.mark.parametrize("rows,count", [(1, 32), (37, 48), (16, 104)])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8", "4:8 forced"])
def test_obs_sweep_float64(backend, gen, rows, count, pattern):
    """float64 inputs sweep in float64, to float64 tolerances (CUDA: float32 only, see
    test_dispatch's limits)."""
    n, m = _pattern(pattern)
    W1, Hinv1 = sweep_block(gen, rows, count, "ill", dtype=torch.float64)
    Hinv1 = Hinv1.double()
    keep1 = _keep1(gen, W1, Hinv1, pattern)
    dev = backend.device
    out = backend.op("obs_sweep")(
        W1.to(dev), Hinv1.to(dev), None if keep1 is None else keep1.to(dev), n, m
    )
    check_obs_sweep(out, W1, Hinv1, keep1, n, m, what=f"{backend.name} float64")


@backends
def test_obs_sweep_needs_keep1_without_nm(backend, gen):
    W1, Hinv1 = sweep_block(gen, 4, 16, "plain")
    dev = backend.device
    with pytest.raises((ValueError, RuntimeError), match="keep1"):
        backend.op("obs_sweep")(W1.to(dev), Hinv1.to(dev), None, 0, 0)


@pytest.mark.parametrize("backend", backend_params("obs_sweep", fast_only=True)[:1], indirect=True)
def test_triton_obs_sweep_bad_args(backend, gen):
    W1, Hinv1 = sweep_block(gen, 4, 16, "plain")
    sweep = backend.op("obs_sweep")
    dev = backend.device
    W1, Hinv1 = W1.to(dev), Hinv1.to(dev)
    with pytest.raises(ValueError, match="Hinv1"):
        sweep(W1, Hinv1[:8, :8], W1 > 0)
    with pytest.raises(ValueError, match="N:M"):
        sweep(W1[:, :14], Hinv1[:14, :14], None, 2, 4)
    with pytest.raises(ValueError, match="keep1"):
        sweep(W1, Hinv1, (W1 > 0).float())


def test_check_obs_sweep_catches_a_wrong_group_choice(gen):
    """The near-tie check is not vacuous: a 2:4 mask with one group's choice swapped (a
    clearly larger score pruned instead of the lowest) is refused."""
    W1, Hinv1 = sweep_block(gen, 64, 64, "plain")  # 2 flips of 4096: agreement alone passes
    out = oracle_obs_sweep(W1, Hinv1, None, 2, 4)
    q, err, keep, loss = (t.float() if t.is_floating_point() else t for t in out[:4])
    keep = keep.clone()
    grp = keep[0, :4]
    s = out.score[0, :4]
    lo = int(torch.where(grp, torch.full_like(s, float("inf")), s).argmin())  # a pruned one
    hi = int(torch.where(grp, s, torch.full_like(s, -1.0)).argmax())  # the largest kept
    keep[0, lo], keep[0, hi] = True, False
    with pytest.raises(AssertionError, match="row 0 group 0 .* near-tie tolerance"):
        check_obs_sweep((q, err, keep, loss), W1, Hinv1, None, 2, 4)


# ------------------------------------------------------------------ the batched form

BATCH_CASES = [
    # E, rows, count, patterns: batches of size 1 and more, one row, a prime, a padded tile
    (1, 1, 32, (*BASIC, "2:4 forced")),
    (3, 1, 16, ("unstructured", "2:4", "4:8")),
    (1, 19, 48, ("unstructured", "fixed", "4:8 forced")),
    (3, 37, 64, (*BASIC, "2:4 forced", "4:8 forced")),
    (4, 5, 100, ("unstructured", "fixed", "2:4", "2:4 forced")),
    (2, 3, 17, ("unstructured", "fixed")),
]


def _batch(gen, E, rows, count, pattern, dead=True):
    """A batch of E blocks of different kinds (each its own Hinv1), the keep1 the pattern
    passes per layer, and (with `dead`) a zero column in layer 0 (a dead input channel)."""
    kinds = ("plain", "ill", "columnar")
    blocks = [sweep_block(gen, rows, count, kinds[e % 3]) for e in range(E)]
    W1 = torch.stack([w for w, _ in blocks])
    Hinv1 = torch.stack([h for _, h in blocks])
    if dead:
        W1[0, :, count // 2] = 0
    keeps = [_keep1(gen, W1[e], Hinv1[e], pattern) for e in range(E)]
    keep1 = None if keeps[0] is None else torch.stack(keeps)
    return W1, Hinv1, keep1


@backends
@pytest.mark.parametrize(
    "E,rows,count,pattern", [(E, r, c, p) for E, r, c, ps in BATCH_CASES for p in ps]
)
def test_obs_sweep_batched(backend, gen, E, rows, count, pattern):
    """`W1 [E, rows, count]` through dispatch on each backend: a backend that declares the
    batched form runs it (one call for the batch), one that does not is passed over for the
    next of its chain, and says so; every layer equals the float64 oracle of its own block."""
    n, m = _pattern(pattern)
    W1, Hinv1, keep1 = _batch(gen, E, rows, count, pattern)
    dev = backend.device
    args = (W1.to(dev, copy=True), Hinv1.to(dev, copy=True))
    args += (None if keep1 is None else keep1.to(dev, copy=True),)
    k = Kernels(backend.name, dev, ("obs_sweep",))
    out = k("obs_sweep", *args, n, m)
    check_obs_sweep(out, W1, Hinv1, keep1, n, m, what=f"{backend.name} batched obs_sweep")
    if n and keep1 is None:
        assert check_nm_keep_mask(out.keep.cpu().reshape(E * rows, count), n, m)
    ran = k.info()["kernels"]["obs_sweep"]
    if "obs_sweep" in backend_batched(backend.name):
        assert ran == backend.name and "kernel_fallbacks" not in k.info()
    else:
        assert ran != backend.name
        assert k.info()["kernel_fallbacks"]["obs_sweep"] == f"{backend.name}: no batched form"
    for a, b in zip(args, (W1, Hinv1, keep1)):
        assert a is None or torch.equal(a.cpu(), b), "inputs are not modified"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("pattern", ["fixed", "2:4", "4:8 forced"])
def test_obs_sweep_batch_of_one_is_the_layer(backend, gen, pattern):
    """A backend's batched form with E = 1 gives the one-layer form's output, bit for bit."""
    if "obs_sweep" not in backend_batched(backend.name):
        pytest.skip(f"{backend.name} declares no batched obs_sweep")
    n, m = _pattern(pattern)
    W1, Hinv1, keep1 = _batch(gen, 1, 23, 48, pattern)
    dev = backend.device
    k1 = None if keep1 is None else keep1.to(dev)
    sweep = backend.op("obs_sweep")
    batched = sweep(W1.to(dev), Hinv1.to(dev), k1, n, m)
    alone = sweep(W1[0].to(dev), Hinv1[0].to(dev), None if k1 is None else k1[0], n, m)
    for a, b in zip(batched, alone):
        assert torch.equal(a[0], b)


def test_torch_obs_sweep_batched_is_deprecated(gen):
    W1, Hinv1, keep1 = _batch(gen, 2, 4, 16, "fixed")
    with pytest.warns(DeprecationWarning, match="torch_obs_sweep takes"):
        out = torch_obs_sweep_batched(W1, Hinv1, keep1)
    for a, b in zip(out, torch_obs_sweep(W1, Hinv1, keep1)):
        assert torch.equal(a, b)
