"""The solvers on CUDA tensors (torch reference and 'auto'), against the CPU results.
Skipped without a GPU; CPU CI covers the same semantics on CPU tensors."""

import pytest
import torch
from conftest import assert_weights_agree_where_masks_do
from op_oracles import check_obs_solve, check_rose_solve, check_swap_result

import fastprune as fp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = [
    ("sparsegpt", lambda W, H, **k: fp.sparsegpt_layer(W, H, **k)),
    ("rose", lambda W, H, **k: fp.rose_layer(W, H, **k)),
]


@pytest.mark.parametrize("name,fn", CASES)
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_obs_solvers_on_cuda_match_cpu(shadow, column_losses_seen, gen, name, fn, backend, n, m):
    """The GPU solve is the float64 research loop along its own mask (every mask choice the
    rule's up to near-ties; each kernel call also checked by `shadow`); weights within 1e-4
    and losses within 1e-3 of the CPU solve's on every row whose mask agrees."""
    torch.backends.cuda.matmul.allow_tf32 = False
    W, H, _ = fp.testing.random_layer(96, 384, columnar=True, generator=gen)
    gpu = fn(W.cuda(), H.cuda(), prune_n=n, prune_m=m, backend=backend)
    seen = list(column_losses_seen)
    cpu = fn(W, H, prune_n=n, prune_m=m, backend="torch")
    assert gpu.weight.device.type == "cuda" and gpu.info["device"].startswith("cuda")
    assert shadow["obs_sweep"] >= 2
    own = dict(rtol=1e-4, what=f"cuda {name}")
    if name == "rose":
        check_rose_solve(gpu, W.cuda(), H.cuda(), 0.5, n, m, losses=seen[-1], **own)
    else:
        check_obs_solve(gpu, W.cuda(), H.cuda(), 0.5, n, m, **own)
    rows = assert_weights_agree_where_masks_do(
        gpu.weight.cpu(), cpu.weight, gpu.mask.cpu(), cpu.mask, 1e-4
    )
    lg, lc = (_row_losses(W, r.weight, H)[rows].sum().item() for r in (gpu, cpu))
    assert lg == pytest.approx(lc, rel=1e-3, abs=1e-12)


def _row_losses(W, Wp, H):
    D = (W - Wp.cpu()).double()
    return ((D @ H.double()) * D).sum(1)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_sparseswaps_on_cuda(swaps_checked, gen, backend, n, m):
    """Every step's search the exhaustive minimum (ties either way), the result a local
    optimum of its own mask; the CPU run's loss when no near-tie took another path."""
    W, H, _ = fp.testing.random_layer(64, 128, generator=gen)
    cpu = fp.sparseswaps_layer(W, H, prune_n=n, prune_m=m, backend="torch")
    gpu = fp.sparseswaps_layer(W.cuda(), H.cuda(), prune_n=n, prune_m=m, backend=backend)
    assert swaps_checked["swap_search"] >= 2
    check_swap_result(gpu, W, H, n, m, converged=True)
    if torch.equal(gpu.mask.cpu(), cpu.mask):
        assert gpu.loss == pytest.approx(cpu.loss, rel=1e-4)


def test_score_methods_on_cuda(gen):
    W, H, _ = fp.testing.random_layer(32, 128, generator=gen)
    G = torch.rand(32, 128, generator=gen)
    for cpu, gpu in [
        (fp.wanda_layer(W, H), fp.wanda_layer(W.cuda(), H.cuda())),
        (fp.magnitude_layer(W), fp.magnitude_layer(W.cuda())),
        (fp.gblm_layer(W, H, G=G), fp.gblm_layer(W.cuda(), H.cuda(), G=G.cuda())),
    ]:
        assert torch.equal(gpu.mask.cpu(), cpu.mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fast_hessian_on_tensor_cores(gen, dtype):
    """The tensor-core Hessian (half-precision products, float32 accumulation) against the
    float64 H of the same inputs, and against the reference's float32 arithmetic."""
    cols = 256
    xs = [(torch.randn(2, 512, cols, generator=gen) * 4).to(dtype) for _ in range(4)]
    flat = torch.cat([x.reshape(-1, cols).double() for x in xs])
    truth = 2 / 8 * flat.t() @ flat
    got = {}
    for precision in ("exact", "fast"):
        acc = fp.HessianAccumulator(cols, device="cuda", precision=precision)
        for x in xs:
            acc.add_batch(x.cuda())
        got[precision] = acc.H.double().cpu()
        err = ((got[precision] - truth).norm() / truth.norm()).item()
        assert err < 1e-5, f"{precision}: relative error {err:.2e} against float64"
    assert ((got["fast"] - got["exact"]).norm() / truth.norm()).item() < 1e-5


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_lstsq_refit_on_cuda_matches_a_dense_solve(gen, n, m):
    """The conjugate-gradient refit on CUDA tensors: the per-row dense float64 solve's
    weights (1e-3 of their scale: the iteration tolerance), a damped loss (what both
    minimise) at or below OBS's."""
    from fastprune.solvers.refit import damped_hessian, refit_masked

    torch.backends.cuda.matmul.allow_tf32 = False
    W, H, _ = fp.testing.random_layer(96, 384, columnar=True, generator=gen)
    sg = fp.sparsegpt_layer(W.cuda(), H.cuda(), prune_n=n, prune_m=m)
    x, info = refit_masked(W.cuda(), H.cuda(), sg.mask, sg.weight, iters=400, tol=1e-7)
    assert x.device.type == "cuda" and not x[~sg.mask].any()
    Hd, _ = damped_hessian(H.double(), 0.01)
    want = torch.zeros_like(W, dtype=torch.float64)
    mask = sg.mask.cpu()
    for i in range(W.shape[0]):
        K = mask[i].nonzero().squeeze(1)
        want[i, K] = torch.linalg.solve(Hd[K][:, K], (W[i].double() @ Hd)[K])
    err = (x.cpu().double() - want).abs().max() / want.abs().max()
    assert err < 1e-3, (err, info)

    def damped(w):
        D = w.cpu().double() - W.double()
        return float(((D @ Hd) * D).sum())

    assert damped(x) <= damped(sg.weight) * (1 + 1e-6)
