"""SparseGPT over a batch of same-shaped layers (a projection's experts) against
`sparsegpt_layer` on each layer alone, and the batched inverse against `inverse_hessian`.
The batch runs the one OBS block loop with the ops' batched forms, on what dispatch picks."""

import pytest
import torch
from conftest import CUDA_PROBLEM, HAS_GPU, LAYER_RTOL, assert_weights_agree_where_masks_do
from op_oracles import check_obs_solve, check_obs_sweep, layer, random_keep, sweep_block

import fastprune as fp
from fastprune.ops.dispatch import backend_batched
from fastprune.ops.obs_sweep import torch_obs_sweep
from fastprune.solvers.sparsegpt_batched import inverse_hessians, sparsegpt_experts

PATTERNS = [(0, 0), (2, 4), (4, 8)]
SHAPES = [(1, 64, 32), (37, 104, 32), (53, 200, 64)]  # rows, cols, blocksize (primes, 1 row)


def _experts(gen, E, rows, cols, bs, kinds=("plain", "columnar", "ill")):
    pairs = [layer(gen, rows, cols, kinds[e % len(kinds)], blocksize=bs) for e in range(E)]
    return torch.stack([w for w, _ in pairs]), torch.stack([h for _, h in pairs])


def _row_losses(W, Wp, H):
    D = (W - Wp).double()
    return ((D @ H.double()) * D).sum(1)


@pytest.mark.parametrize("rows,cols,bs", SHAPES)
@pytest.mark.parametrize("n,m", PATTERNS)
def test_each_expert_equals_its_own_solve(gen, rows, cols, bs, n, m):
    if m and cols % m:
        pytest.skip("cols not divisible by M")
    W, H = _experts(gen, 5, rows, cols, bs)
    H[1, :, 3] = 0  # a dead column in one expert
    H[1, 3, :] = 0
    got = sparsegpt_experts(W, H, 0.5, n, m, blocksize=bs)
    invs = inverse_hessians(H, 0.01)
    for e in range(W.shape[0]):
        want = fp.sparsegpt_layer(W[e], H[e], 0.5, n, m, blocksize=bs)
        # each expert is the research loop on its inverse along its own mask (decisions the
        # rule's up to near-ties), equal to its own solve on every row whose mask agrees
        check_obs_solve(got[e], W[e], H[e], 0.5, n, m, bs, hinv=invs[e], what=f"expert {e}")
        rows = assert_weights_agree_where_masks_do(
            got[e].weight, want.weight, got[e].mask, want.mask, LAYER_RTOL
        )
        assert got[e].loss == pytest.approx(fp.layer_loss(W[e], got[e].weight, H[e]), rel=1e-4)
        la, lb = (_row_losses(W[e], r.weight, H[e])[rows].sum().item() for r in (got[e], want))
        assert la == pytest.approx(lb, rel=1e-4, abs=1e-12)
        assert got[e].info["dead_columns"] == want.info["dead_columns"]
        assert got[e].info["achieved_sparsity"] == want.info["achieved_sparsity"]


def test_odd_experts_follow_the_single_rules(gen):
    """An expert that needs damping retries, or rescaling (huge weights: rescaled exactly in
    the batch, as the skeleton does alone), or has no data (H = 0) is solved by
    `sparsegpt_layer`'s own rules; W and H are not modified."""
    W, H = _experts(gen, 4, 12, 48, 16)
    # indefinite (eigenvalue 1 - 47 * 0.05 < 0) though every 2x2 minor is PSD: it factors
    # only after damping retries
    H[0] = torch.full((48, 48), -0.05) + 1.05 * torch.eye(48)
    H[1] = 0  # no data
    W[2] *= 2.0**60  # outside the solve's weight range: rescaled exactly
    W0, H0 = W.clone(), H.clone()
    got = sparsegpt_experts(W, H, 0.5, blocksize=16)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    for e in range(4):
        want = fp.sparsegpt_layer(W[e], H[e], 0.5, blocksize=16)
        assert torch.equal(got[e].mask, want.mask), f"expert {e}"
        torch.testing.assert_close(got[e].weight, want.weight, rtol=1e-5, atol=0)
        assert got[e].info["damp_retries"] == want.info["damp_retries"]
        assert got[e].info.get("rescaled") == want.info.get("rescaled")
    assert got[0].info["damp_retries"] > 0 and got[1].info["dead_columns"] == 48
    assert "rescaled" in got[2].info and "rescaled" not in got[3].info


@pytest.mark.parametrize("n,m", PATTERNS)
def test_batch_of_one_is_the_layer(gen, n, m):
    """One expert with its own inverse is `sparsegpt_layer` bit for bit (torch): the same
    loop, the same ops."""
    W, H = _experts(gen, 1, 13, 72, 24)
    inv = fp.inverse_hessian(H[0], 0.01)
    got = sparsegpt_experts(W, H, 0.5, n, m, blocksize=24, backend="torch", hinvs=[inv])[0]
    want = fp.sparsegpt_layer(W[0], H[0], 0.5, n, m, blocksize=24, backend="torch", hinv=inv)
    assert torch.equal(got.weight, want.weight) and torch.equal(got.mask, want.mask)
    assert got.loss == want.loss
    assert got.info["kernels"] == want.info["kernels"]


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_dispatch_records_what_ran(gen, n, m):
    """`info["kernels"]` of every expert is what dispatch ran for the batch."""
    W, H = _experts(gen, 3, 8, 32, 16)
    want = {"obs_sweep": "torch"} if n else {"block_prune_mask": "torch", "obs_sweep": "torch"}
    for r in sparsegpt_experts(W, H, 0.5, n, m, blocksize=16, backend="torch"):
        assert r.info["kernels"] == want and "kernel_fallbacks" not in r.info
        assert r.info["backend"] == "torch" and r.info["batched"] == 3


def test_batched_inverse_equals_single(gen):
    _, H = _experts(gen, 4, 8, 300, 64)  # 300 > the triangular inverse's 256-column leaf
    H[2, :, 7] = 0
    H[2, 7, :] = 0
    for got, Hs in zip(inverse_hessians(H, 0.01), H):
        want = fp.inverse_hessian(Hs, 0.01)
        torch.testing.assert_close(got.hinv, want.hinv, rtol=2e-4, atol=1e-6)
        assert torch.equal(got.dead, want.dead) and got.damp == pytest.approx(want.damp)


def _equal_where_masks_agree(out, want, what):
    """A sweep's (q, err, keep, loss_rows) equal another's on every row whose masks agree
    (rows of a sweep are independent given their mask)."""
    q, _, keep, loss = (t.cpu() for t in out)
    wq, _, wkeep, wloss = (t.cpu() for t in want)
    rows = (keep == wkeep).all(1)
    torch.testing.assert_close(q[rows], wq[rows], rtol=1e-5, atol=1e-5, msg=what)
    torch.testing.assert_close(loss[rows], wloss[rows], rtol=1e-4, atol=1e-6, msg=what)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("rows,count", [(1, 16), (29, 40), (64, 128)])
def test_batched_sweep_equals_single(gen, rows, count, n, m):
    if m and count % m:
        pytest.skip("count not divisible by M")
    blocks = [sweep_block(gen, rows, count, kind) for kind in ("plain", "ill", "columnar")]
    W1 = torch.stack([w for w, _ in blocks])
    Hinv1 = torch.stack([h for _, h in blocks])
    keep1 = None if n else torch.stack([random_keep(gen, rows, count) for _ in blocks])
    got = torch_obs_sweep(W1, Hinv1, keep1, n, m)
    for e in range(3):
        k1 = None if keep1 is None else keep1[e]
        want = torch_obs_sweep(W1[e], Hinv1[e], k1, n, m)
        out = (got.q[e], got.err[e], got.keep[e], got.loss_rows[e])
        check_obs_sweep(out, W1[e], Hinv1[e], k1, n, m, what=f"layer {e}")
        _equal_where_masks_agree(out, want, f"layer {e}")


def test_bad_shapes_are_refused(gen):
    W, H = _experts(gen, 2, 4, 16, 16)
    with pytest.raises(ValueError, match="W must be"):
        sparsegpt_experts(W[0], H, 0.5)
    with pytest.raises(ValueError, match="W must be"):
        sparsegpt_experts(W, H[:1], 0.5)
    W[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="W"):
        sparsegpt_experts(W, H, 0.5)


def test_inverses_of_other_hessians_are_refused(gen):
    W, H = _experts(gen, 3, 8, 32, 16)
    invs = inverse_hessians(H)
    sparsegpt_experts(W, H, 0.5, hinvs=invs)  # their own: accepted
    invs[1] = fp.inverse_hessian(H[2])
    with pytest.raises(ValueError, match=r"hinvs\[1\] is not the inverse"):
        sparsegpt_experts(W, H, 0.5, hinvs=invs)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("rows,count", [(1, 16), (29, 40), (33, 64)])
def test_triton_sweep_over_layers_equals_torch(gen, rows, count, n, m):
    """Triton's `obs_sweep` launched over E layers (grid: row tiles x layers; the
    interpreter on CPU) against torch's batched sweep, layer by layer."""
    pytest.importorskip("triton")
    from fastprune.triton_kernels.obs_sweep import triton_obs_sweep

    if m and count % m:
        pytest.skip("count not divisible by M")
    blocks = [sweep_block(gen, rows, count, kind) for kind in ("plain", "ill", "columnar")]
    W1 = torch.stack([w for w, _ in blocks])
    Hinv1 = torch.stack([h for _, h in blocks])
    keep1 = None if n else torch.stack([random_keep(gen, rows, count) for _ in blocks])
    got = triton_obs_sweep(W1, Hinv1, keep1, n, m)
    want = torch_obs_sweep(W1, Hinv1, keep1, n, m)
    for e in range(3):
        k1 = None if keep1 is None else keep1[e]
        out = tuple(t[e] for t in got)
        check_obs_sweep(out, W1[e], Hinv1[e], k1, n, m, what=f"triton layer {e}")
        ref = (want.q[e], want.err[e], want.keep[e], want.loss_rows[e])
        _equal_where_masks_agree(out, ref, f"triton layer {e}")


def test_triton_backend_solves_experts(gen):
    """`sparsegpt_experts(backend="triton")` (one sweep launch over the experts) equals each
    expert's own `sparsegpt_layer(backend="triton")`."""
    pytest.importorskip("triton")
    W, H = _experts(gen, 3, 10, 48, 16)
    got = sparsegpt_experts(W, H, 0.5, 2, 4, blocksize=16, backend="triton")
    invs = inverse_hessians(H, 0.01)
    for e in range(3):
        want = fp.sparsegpt_layer(W[e], H[e], 0.5, 2, 4, blocksize=16, backend="triton")
        check_obs_solve(got[e], W[e], H[e], 0.5, 2, 4, 16, hinv=invs[e], what=f"expert {e}")
        assert_weights_agree_where_masks_do(
            got[e].weight, want.weight, got[e].mask, want.mask, LAYER_RTOL
        )
        assert got[e].info["kernels"] == {"obs_sweep": "triton"}


def test_triton_unstructured_experts_fall_back_where_triton_has_no_batch(gen):
    """Triton's `block_prune_mask` takes no batch: dispatch runs torch's and says why."""
    pytest.importorskip("triton")
    W, H = _experts(gen, 2, 6, 32, 16)
    for r in sparsegpt_experts(W, H, 0.5, blocksize=16, backend="triton"):
        assert r.info["kernels"] == {"block_prune_mask": "torch", "obs_sweep": "triton"}
        why = r.info["kernel_fallbacks"]["block_prune_mask"]
        assert why == "triton: no batched form"


@pytest.mark.skipif(CUDA_PROBLEM is not None, reason=str(CUDA_PROBLEM))
def test_cuda_backend_solves_experts(gen, monkeypatch):
    """backend="cuda" batches too: the CUDA sweep where it declares the batched form, else
    the next of its chain (Triton), recorded with the reason (the CPU emulator without a
    GPU)."""
    pytest.importorskip("triton")
    if not HAS_GPU:
        monkeypatch.setenv("FASTPRUNE_CUDA_EMULATE", "1")
    dev = torch.device("cuda" if HAS_GPU else "cpu")
    W, H = _experts(gen, 2, 9, 32, 16)
    W, H = W.to(dev), H.to(dev)
    got = sparsegpt_experts(W, H, 0.5, 2, 4, blocksize=16, backend="cuda")
    invs = inverse_hessians(H, 0.01)
    ran = "cuda" if "obs_sweep" in backend_batched("cuda") else "triton"
    for e in range(2):
        check_obs_solve(got[e], W[e], H[e], 0.5, 2, 4, 16, hinv=invs[e], what=f"expert {e}")
        assert got[e].info["kernels"] == {"obs_sweep": ran}
        if ran != "cuda":
            assert got[e].info["kernel_fallbacks"]["obs_sweep"] == "cuda: no batched form"
