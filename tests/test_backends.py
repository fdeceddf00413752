"""The solvers (sparsegpt, rose, sparseswaps layers and the prune_model pipeline) on each
fast backend (Triton, CUDA) against the same solve on backend="torch".

How a fast solve is held to the reference (docs/semantics.md, Exactness):
- every kernel call of the solve is checked as it happens against its op's float64 oracle
  on the very inputs it got (`shadow` in conftest: masks agree up to near-ties, values within
  OP_RTOL), so each mask flip is a float32 near-tie where it was made;
- the whole fast solve is the research loop (float64) run along its own mask: every mask
  decision the loop's rule on the scores it reaches up to near-ties, the weights the loop's
  on every row (`op_oracles.check_obs_solve`);
- the weights and losses equal the torch solve's on every row whose mask agrees (rows of an
  OBS solve are independent given their mask). How many rows a draw's near-ties touch is
  not asserted: that depends on the draw.

On CPU the Triton kernels run in the interpreter and the CUDA kernels on the emulator
(FASTPRUNE_CUDA_EMULATE=1); there the ops the CUDA backend has no kernel of run on torch
rather than the (slow) interpreted Triton (the triton param covers those kernels), and shapes
are small. Inputs are seeded per test (`gen`; FASTPRUNE_TEST_SEED=random for fresh ones).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    HALF_ULP,
    LAYER_RTOL,
    MASK_AGREE,
    MODEL_RTOL,
    assert_close,
    assert_masks_agree,
    assert_weights_agree_where_masks_do,
    backend_params,
)
from op_oracles import PATTERNS, check_obs_solve, check_rose_solve, check_swap_result, layer

import fastprune as fp
from fastprune.masks import check_nm_keep_mask
from fastprune.ops import Kernels
from fastprune.solvers.sparseswaps import SWAP_OPS, swap_refine

FAST = backend_params(fast_only=True)
fast_backends = pytest.mark.parametrize("backend", FAST, indirect=True)


@pytest.fixture
def solver_backend(backend, monkeypatch):
    """`backend`, set up for whole solves (see the module docstring for the emulator)."""
    if backend.emulated:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return backend


def compare_layers(a, b, W, H, rtol=LAYER_RTOL):
    """Weights within `rtol` on every row whose masks agree (rows of an OBS solve are
    independent given their mask; one unit of the dtype's rounding for half-precision
    outputs), and those rows' losses within 1e-4. Where masks differ, each choice was checked
    a near-tie where it was made (`shadow`, and the callers' check along the fast solve's own
    mask): how many rows a draw's near-ties touch is not asserted."""
    assert a.weight.dtype == b.weight.dtype == W.dtype
    ma, mb = a.mask.cpu(), b.mask.cpu()
    rows = (ma == mb).all(1)
    if W.dtype in HALF_ULP:
        wa, wb = a.weight.cpu()[rows].double(), b.weight.cpu()[rows].double()
        atol = 1e-5 * wb.abs().max().item() if wb.numel() else 0.0
        assert_close(wa, wb, rtol=HALF_ULP[W.dtype] + 1e-5, atol=atol, what="weight")
    else:
        assert_weights_agree_where_masks_do(a.weight, b.weight, ma, mb, rtol)
    la = row_losses(W, a.weight, H)[rows].sum().item()
    lb = row_losses(W, b.weight, H)[rows].sum().item()
    assert abs(la - lb) <= 1e-4 * abs(lb) + 1e-12, (la, lb)


def row_losses(W, Wp, H):
    D = (W.cpu() - Wp.cpu()).double()
    return ((D @ H.cpu().double()) * D).sum(1)


def own_path_rtol(dtype, rtol=LAYER_RTOL):
    """The weights' tolerance against the float64 loop along the same mask."""
    return HALF_ULP[dtype] + rtol if dtype in HALF_ULP else rtol


# ---------------------------------------------------------------- sparsegpt and rose

LAYER_CASES = [
    # solver, rows, cols, blocksize, pattern, H kind, dtype
    ("sparsegpt", 24, 100, 32, "unstructured", "plain", torch.float32),
    ("sparsegpt", 1, 64, 64, "2:4", "ill", torch.float32),
    ("sparsegpt", 37, 96, 32, "4:8", "columnar", torch.bfloat16),
    ("rose", 37, 128, 32, "unstructured", "columnar", torch.float32),
    ("rose", 16, 128, 64, "2:4", "columnar", torch.float16),
    ("rose", 24, 100, 32, "unstructured", "ill", torch.bfloat16),
    ("sparsegpt", 37, 256, 128, "2:4", "plain", torch.float32),
    ("sparsegpt", 24, 160, 64, "unstructured", "columnar", torch.float16),
    ("rose", 37, 96, 32, "4:8", "plain", torch.float32),
    ("rose", 1, 100, 32, "unstructured", "plain", torch.float32),
]
SOLVERS = {"sparsegpt": fp.sparsegpt_layer, "rose": fp.rose_layer}


def _kernel_names(backend, ops):
    """What a solve on `backend` records for `ops` (its own kernels where it has them)."""
    from fastprune.ops import backend_ops

    own = backend_ops(backend.name)
    other = "torch" if backend.emulated else "triton"
    names = {op: backend.name if op in own else other for op in ops}
    if "block_prune_mask" in names and backend.device.type == "cuda":
        names["block_prune_mask"] = "torch"  # triton's radix selection declines GPUs (slower)
    return names


@fast_backends
@pytest.mark.parametrize(
    "solver,rows,cols,bs,pattern,kind,dtype",
    LAYER_CASES,
    ids=["-".join(map(str, c)).replace("torch.", "") for c in LAYER_CASES],
)
def test_layer_vs_torch(
    solver_backend, shadow, column_losses_seen, gen, solver, rows, cols, bs, pattern, kind, dtype
):
    b = solver_backend
    n, m = PATTERNS[pattern]
    W, H = layer(gen, rows, cols, kind, blocksize=bs, dtype=dtype, dead=2)
    kw = dict(sparsity=0.5, prune_n=n, prune_m=m, blocksize=bs)
    got = SOLVERS[solver](W.to(b.device), H.to(b.device), backend=b.name, **kw)
    ref = SOLVERS[solver](W, H, backend="torch", **kw)
    assert got.info["backend"] == b.name and ref.info["backend"] == "torch"
    ops = ("obs_sweep",) + (() if n else ("block_prune_mask",))
    ops += ("column_losses",) if solver == "rose" else ()
    assert got.info["kernels"] == _kernel_names(b, ops)
    assert shadow["obs_sweep"] >= 1
    own = dict(rtol=own_path_rtol(dtype), what=f"{b.name} {solver}")
    Wd, Hd = W.to(b.device), H.to(b.device)
    if solver == "rose":
        check_rose_solve(got, Wd, Hd, 0.5, n, m, bs, losses=column_losses_seen[0], **own)
    else:
        check_obs_solve(got, Wd, Hd, 0.5, n, m, bs, **own)
    compare_layers(got, ref, W, H)
    if n:
        assert check_nm_keep_mask(got.mask.cpu(), n, m)
    if solver == "rose":
        assert got.info["reordered"] == ref.info["reordered"]
        assert abs(got.info["relative_range"] - ref.info["relative_range"]) <= 1e-5


@fast_backends
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_rose_reordered_vs_torch(solver_backend, shadow, column_losses_seen, gen, pattern):
    """range_threshold=0 forces the reordering path (with cols=100 and blocksize 32 the
    reordered sweep blocks are irregular: the short block moves)."""
    b = solver_backend
    n, m = PATTERNS[pattern]
    W, H = layer(gen, 19, 100, "columnar", blocksize=32)
    kw = dict(sparsity=0.5, prune_n=n, prune_m=m, blocksize=32, range_threshold=0.0)
    got = fp.rose_layer(W.to(b.device), H.to(b.device), backend=b.name, **kw)
    ref = fp.rose_layer(W, H, backend="torch", **kw)
    assert got.info["reordered"] and ref.info["reordered"]
    Wd, Hd = W.to(b.device), H.to(b.device)
    check_rose_solve(got, Wd, Hd, 0.5, n, m, 32, losses=column_losses_seen[0], what=b.name)
    compare_layers(got, ref, W, H)


@fast_backends
def test_layer_fixed_mask_vs_torch(solver_backend, shadow, gen):
    b = solver_backend
    W, H = layer(gen, 21, 72, "plain")
    keep = torch.rand(W.shape, generator=gen) > 0.4
    got = fp.sparsegpt_layer(
        W.to(b.device), H.to(b.device), mask=keep.to(b.device), blocksize=32, backend=b.name
    )
    ref = fp.sparsegpt_layer(W, H, mask=keep, blocksize=32, backend="torch")
    assert torch.equal(got.mask.cpu(), keep) and torch.equal(ref.mask, keep)
    assert got.info["kernels"] == {"obs_sweep": b.name}
    compare_layers(got, ref, W, H)


@fast_backends
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_experts_vs_torch(solver_backend, shadow, gen, pattern):
    """A projection's experts solved as one batch (`sparsegpt_experts`: the ops' batched
    forms through dispatch) on each fast backend: every kernel call checked against its
    oracle layer by layer (`shadow`), each expert the research loop along its own mask, and
    equal to the torch batch on every row whose mask agrees."""
    from fastprune.solvers.sparsegpt_batched import inverse_hessians, sparsegpt_experts

    b = solver_backend
    n, m = PATTERNS[pattern]
    pairs = [layer(gen, 9, 64, kind, blocksize=32, dead=e) for e, kind in enumerate(
        ("plain", "ill", "columnar"))]  # fmt: skip
    W, H = torch.stack([w for w, _ in pairs]), torch.stack([h for _, h in pairs])
    Wd, Hd = W.to(b.device), H.to(b.device)
    got = sparsegpt_experts(Wd, Hd, 0.5, n, m, blocksize=32, backend=b.name)
    ref = sparsegpt_experts(W, H, 0.5, n, m, blocksize=32, backend="torch")
    assert shadow["obs_sweep"] >= 2 * (64 // 32)
    invs = inverse_hessians(Hd, 0.01)
    want = {"obs_sweep": b.name} | ({} if n else {"block_prune_mask": "torch"})
    for e in range(3):
        assert got[e].info["kernels"] == want and got[e].info["backend"] == b.name
        check_obs_solve(got[e], Wd[e], Hd[e], 0.5, n, m, 32, hinv=invs[e], what=f"expert {e}")
        compare_layers(got[e], ref[e], W[e], H[e])


@pytest.mark.parametrize("backend", FAST[1:], indirect=True)
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_columnar_layer_all_solvers(
    solver_backend, shadow, column_losses_seen, swaps_checked, gen, n, m
):
    """A columnar layer through sparsegpt, rose and sparseswaps on the CUDA kernels (bigger
    on a GPU)."""
    b = solver_backend
    on_gpu = b.device.type == "cuda"
    rows, cols, steps = (96, 384, 50) if on_gpu else (40, 256, 6)
    W, H, _ = fp.testing.random_layer(rows, cols, columnar=True, generator=gen)
    rtol = MODEL_RTOL if on_gpu else LAYER_RTOL  # GPU vs CPU: another library's GEMMs
    Wd, Hd = W.to(b.device), H.to(b.device)
    for fn in (fp.sparsegpt_layer, fp.rose_layer):
        got = fn(Wd, Hd, prune_n=n, prune_m=m, backend=b.name)
        seen = list(column_losses_seen)
        ref = fn(W, H, prune_n=n, prune_m=m, backend="torch")
        assert got.info["backend"] == b.name
        own = dict(rtol=rtol, what=f"{b.name} {fn.__name__}")
        if fn is fp.rose_layer:
            check_rose_solve(got, Wd, Hd, 0.5, n, m, losses=seen[-1], **own)
        else:
            check_obs_solve(got, Wd, Hd, 0.5, n, m, **own)
        compare_layers(got, ref, W, H, rtol=rtol)
    kw = dict(prune_n=n, prune_m=m, max_swaps=steps)
    ref = fp.sparseswaps_layer(W, H, backend="torch", **kw)
    got = fp.sparseswaps_layer(W.to(b.device), H.to(b.device), backend=b.name, **kw)
    assert got.info["backend"] == b.name
    assert got.info["kernels"] == _kernel_names(b, SWAP_OPS)
    assert swaps_checked["swap_search"] >= 2  # every step of both runs checked
    check_swap_result(got, W, H, n, m, converged=False)
    if torch.equal(got.mask.cpu(), ref.mask):  # no near-tie took another path
        assert got.loss == pytest.approx(ref.loss, rel=1e-4)


# ------------------------------------------------------------------------ sparseswaps


@fast_backends
@pytest.mark.parametrize(
    "rows,cols,n,m",
    [(1, 64, 0, 0), (37, 53, 0, 0), (29, 52, 2, 4), (16, 64, 4, 8), (96, 256, 0, 0)],
)
def test_sparseswaps_full_run_vs_torch(solver_backend, swaps_checked, gen, rows, cols, n, m):
    """Until convergence: every step's search the exhaustive minimum (ties either way), the
    result a local optimum whose loss is its mask's, the same final loss as the torch run
    when no near-tie took the two elsewhere; per-row counts and the N:M pattern kept,
    weights the masked input."""
    b = solver_backend
    if b.device.type == "cpu" and rows * cols > 64 * 64:
        rows = 24  # interpreter/emulator: a smaller layer, still many steps
    W, H, _ = fp.testing.random_layer(rows, cols, generator=gen)
    kw = dict(prune_n=n, prune_m=m, sparsity=0.5)
    got = fp.sparseswaps_layer(W.to(b.device), H.to(b.device), backend=b.name, **kw)
    ref = fp.sparseswaps_layer(W, H, backend="torch", **kw)
    assert got.info["backend"] == b.name
    assert swaps_checked["swap_search"] >= 2  # every step of both runs checked
    for r in (got, ref):
        check_swap_result(r, W, H, n, m, converged=True)
    if torch.equal(got.mask.cpu(), ref.mask):  # no near-tie took another path
        lt, lr = got.info["loss_after"], ref.info["loss_after"]
        assert abs(lt - lr) <= 1e-5 * abs(lr), f"final loss {b.name} {lt} vs torch {lr}"
    warm = fp.wanda_layer(W, H, sparsity=0.5, prune_n=n, prune_m=m).mask
    assert torch.equal(got.mask.cpu().sum(1), warm.sum(1)), "per-row kept counts changed"
    if n:
        assert check_nm_keep_mask(got.mask.cpu(), n, m)
    assert torch.equal(got.weight.cpu(), W.masked_fill(~got.mask.cpu(), 0))


@fast_backends
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_sparseswaps_loss_never_rises_per_step(solver_backend, gen, n, m):
    """The exact (float64) loss after each step of the driver on the backend's kernels
    never rises (measured after every swap_apply of one run)."""
    b = solver_backend
    W, H, _ = fp.testing.random_layer(12, 48, generator=gen)
    keep0 = fp.wanda_layer(W, H, sparsity=0.5, prune_n=n, prune_m=m).mask
    H64 = H.double()

    def loss(keep):
        r = (W * ~keep.cpu()).double()
        return ((r @ H64) * r).sum().item()

    losses = [loss(keep0)]

    class Stepwise(Kernels):
        def __call__(self, op, *args, **kwargs):
            out = super().__call__(op, *args, **kwargs)
            if op == "swap_apply":
                losses.append(loss(args[1]))  # keep, updated in place
            return out

    kernels = Stepwise(b.name, b.device, SWAP_OPS)
    keep, info = swap_refine(W.to(b.device), H.to(b.device), keep0.to(b.device), n, m, 40,
                             kernels)  # fmt: skip
    assert info["steps"] == len(losses) - 1 and info["steps"] >= 1
    for step, (prev, cur) in enumerate(zip(losses, losses[1:]), 1):
        assert cur <= prev + 1e-12 * abs(prev), f"loss rose at step {step}: {prev} -> {cur}"
    assert kernels.info()["kernels"] == _kernel_names(b, SWAP_OPS)


# ---------------------------------------------------------------------- prune_model


@pytest.mark.parametrize("backend", FAST[1:], indirect=True)
@pytest.mark.parametrize("method", ["sparsegpt", "rose", "sparseswaps"])
def test_prune_model_on_cuda_backend(solver_backend, shadow, method):
    """The whole pipeline (real activations, shared Hessians, every linear) on the CUDA
    kernels gives the torch reference's model: masks agree, weights agree on the rows whose
    masks agree."""
    pytest.importorskip("transformers")
    from pipeline_helpers import calib_ids, tiny_model

    b = solver_backend
    opts = {"max_swaps": 3} if method == "sparseswaps" else {}
    calib = calib_ids(4, 24)
    ref, got = tiny_model("llama"), tiny_model("llama").to(b.device)
    fp.prune_model(ref, calib, method=method, progress=False, backend="torch", **opts)
    rep = fp.prune_model(
        got, calib.to(b.device), method=method, progress=False, backend="cuda", **opts
    )
    assert rep.achieved_sparsity == pytest.approx(0.5, abs=0.02)
    cuda_op = "swap_search" if method == "sparseswaps" else "obs_sweep"
    assert all(lr.info["kernels"][cuda_op] == "cuda" for lr in rep.layers)
    for (name, a), g in zip(ref.named_parameters(), got.parameters()):
        if a.dim() == 2 and "embed" not in name and "lm_head" not in name:
            ka, kg = a != 0, (g != 0).cpu()
            assert_masks_agree(kg, ka, MASK_AGREE, what=name)
            assert_weights_agree_where_masks_do(g, a, kg, ka, MODEL_RTOL, what=name)
