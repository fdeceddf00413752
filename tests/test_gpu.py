"""The solvers on CUDA tensors (torch reference and 'auto'), against the CPU results.
Skipped without a GPU; CPU CI covers the same semantics on CPU tensors."""

import pytest
import torch
from conftest import MASK_AGREE, assert_masks_agree, assert_weights_agree_where_masks_do

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
def test_obs_solvers_on_cuda_match_cpu(shadow, gen, name, fn, backend, n, m):
    """Masks agree (every mask choice of both solves is checked against the float64 oracle as
    it is made by `shadow`, so a flip is a float32 near-tie); weights within 1e-4 on every
    row whose mask agrees."""
    torch.backends.cuda.matmul.allow_tf32 = False
    W, H, _ = fp.testing.random_layer(96, 384, columnar=True, generator=gen)
    cpu = fn(W, H, prune_n=n, prune_m=m, backend="torch")
    gpu = fn(W.cuda(), H.cuda(), prune_n=n, prune_m=m, backend=backend)
    assert gpu.weight.device.type == "cuda" and gpu.info["device"].startswith("cuda")
    assert shadow["obs_sweep"] >= 2
    assert_masks_agree(gpu.mask.cpu(), cpu.mask, MASK_AGREE)
    assert_weights_agree_where_masks_do(
        gpu.weight.cpu(), cpu.weight, gpu.mask.cpu(), cpu.mask, 1e-4, min_rows=0.9
    )
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-3)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_sparseswaps_on_cuda(gen, backend, n, m):
    W, H, _ = fp.testing.random_layer(64, 128, generator=gen)
    cpu = fp.sparseswaps_layer(W, H, prune_n=n, prune_m=m, backend="torch")
    gpu = fp.sparseswaps_layer(W.cuda(), H.cuda(), prune_n=n, prune_m=m, backend=backend)
    assert gpu.info["loss_after"] <= gpu.info["loss_before"]
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
