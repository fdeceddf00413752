"""Op `block_prune_mask` on every backend that has one (torch, Triton; the CUDA backend has
no kernel of its own) against its float64 oracle: keep `w^2/d^2 > sorted(scores)[k]`,
k = int(numel * sparsity). A float32 backend may differ from the oracle only where a score is
a near-tie with the threshold (docs/semantics.md, Exactness); Triton's exact radix
selection over the same IEEE float32 scores also equals the float32 torch reference exactly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params
from op_oracles import check_block_prune_mask

from fastprune.ops import Kernels, torch_block_prune_mask
from fastprune.ops.dispatch import backend_batched

BACKENDS = backend_params("block_prune_mask")
backends = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def _inputs(gen, rows, cols):
    W1 = torch.randn(rows, cols, generator=gen) * 0.05
    d = torch.rand(cols, generator=gen) + 0.2
    return W1, d


@backends
@pytest.mark.parametrize("rows,cols", [(1, 100), (37, 128), (64, 33), (1, 17), (13, 31)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
def test_block_prune_mask(backend, gen, rows, cols, sparsity):
    W1, d = _inputs(gen, rows, cols)
    dev = backend.device
    keep = backend.op("block_prune_mask")(W1.to(dev), d.to(dev), sparsity)
    check_block_prune_mask(keep, W1, d, sparsity, what=backend.name)
    # the reference's `<=` rule on the float32 scores: one more than int(numel * sparsity)
    # pruned, and every entry tied with the threshold too
    s = W1**2 / d.reshape(1, -1) ** 2
    thr = torch.sort(s.flatten()).values[int(rows * cols * sparsity)]
    assert int((~keep).sum()) == int((s <= thr).sum()) >= int(rows * cols * sparsity) + 1
    # the same float32 scores and an exact selection: the float32 reference's mask exactly
    assert torch.equal(keep.cpu(), torch_block_prune_mask(W1, d, sparsity))


@backends
def test_block_prune_mask_strided_inputs(backend, gen):
    """W1 a column slice of a wider matrix, stored column-major; d a strided diagonal."""
    W, _ = _inputs(gen, 29, 90)
    W1 = W.t().contiguous().t()[:, 20:70]
    D = torch.rand(90, 90, generator=gen) + 0.2
    d = D.diagonal()[20:70]
    assert not W1.is_contiguous() and d.stride(0) == 91
    dev = backend.device
    keep = backend.op("block_prune_mask")(W1.to(dev), d.to(dev), 0.6)
    check_block_prune_mask(keep, W1, d, 0.6, what=f"{backend.name} strided")


@backends
def test_block_prune_mask_ties_and_zero_rows(backend, gen):
    """Quantised weights (many exact ties at the threshold: `<=` prunes all of them) and
    all-zero rows (score 0, pruned first)."""
    W1 = torch.round(torch.randn(23, 40, generator=gen) * 4) / 4
    W1[3] = 0
    d = torch.ones(40)
    dev = backend.device
    keep = backend.op("block_prune_mask")(W1.to(dev), d.to(dev), 0.5)
    check_block_prune_mask(keep, W1, d, 0.5, what=f"{backend.name} ties")
    assert not keep[3].any()


@pytest.mark.parametrize("backend", backend_params("block_prune_mask")[1:2], indirect=True)
def test_radix_select_exact_with_ties_and_signs(backend, gen):
    """Triton's radix selection (shared with column_losses) equals kthvalue exactly:
    negative values, +-0, many ties, a one-column block, k from the sparsity computed on the
    device as Python's int(numel * sparsity)."""
    from fastprune.triton_kernels.radix_select import kth_smallest_blocks

    X = torch.randn(29, 90, generator=gen)
    X[:, :30] = torch.round(X[:, :30] * 4) / 4  # heavy ties
    X[0, :5] = -0.0
    X[1, :5] = 0.0
    bounds = [(0, 30), (30, 61), (61, 90), (10, 11)]
    ks = [0, 450, 29 * 29 - 1, 17]
    got = kth_smallest_blocks(X.to(backend.device), bounds, ks=ks).cpu()
    for b, ((i1, i2), k) in enumerate(zip(bounds, ks)):
        want = torch.kthvalue(X[:, i1:i2].flatten(), k + 1).values
        assert got[b].item() == want.item(), (b, got[b].item(), want.item())
    got = kth_smallest_blocks(X.to(backend.device), bounds, sparsity=0.7).cpu()
    for b, (i1, i2) in enumerate(bounds):
        k = int(29 * (i2 - i1) * 0.7)
        assert got[b].item() == torch.kthvalue(X[:, i1:i2].flatten(), k + 1).values.item()


@backends
@pytest.mark.parametrize("E,rows,cols", [(1, 1, 17), (3, 1, 100), (4, 37, 33), (2, 13, 128)])
def test_block_prune_mask_batched(backend, gen, E, rows, cols):
    """`W1 [E, rows, count]`, `hinv_diag [E, count]` through dispatch: each layer's block
    with its own threshold (the float64 oracle per layer; a layer scaled far from the others
    would otherwise decide a shared threshold), on the backend if it declares the batched
    form, else on the next of its chain, which says why."""
    W1 = torch.stack([_inputs(gen, rows, cols)[0] * 10.0**e for e in range(E)])
    d = torch.stack([_inputs(gen, rows, cols)[1] for _ in range(E)])
    dev = backend.device
    k = Kernels(backend.name, dev, ("block_prune_mask",))
    keep = k("block_prune_mask", W1.to(dev), d.to(dev), 0.5)
    check_block_prune_mask(keep, W1, d, 0.5, what=f"{backend.name} batched")
    for e in range(E):
        assert torch.equal(keep[e].cpu(), torch_block_prune_mask(W1[e], d[e], 0.5))
    ran = k.info()["kernels"]["block_prune_mask"]
    if "block_prune_mask" in backend_batched(backend.name):
        assert ran == backend.name
    else:
        assert k.info()["kernel_fallbacks"]["block_prune_mask"].endswith("no batched form")
