"""Every solver result says which implementation ran each op (`info["kernels"]`), and the
model report collects them."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import calib_ids, tiny_model

import fastprune as fp
from fastprune.ops import OPS


def _layer(gen, rows=12, cols=32):
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(4 * cols, cols, generator=gen)
    return W, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize(
    "solve,expected",
    [
        (lambda W, H: fp.sparsegpt_layer(W, H), {"block_prune_mask", "obs_sweep"}),
        (lambda W, H: fp.sparsegpt_layer(W, H, prune_n=2, prune_m=4), {"obs_sweep"}),
        (lambda W, H: fp.rose_layer(W, H), {"column_losses", "block_prune_mask", "obs_sweep"}),
        (lambda W, H: fp.sparseswaps_layer(W, H, max_swaps=3), {"swap_search", "swap_apply"}),
        (
            lambda W, H: fp.sparseswaps_layer(W, H, max_swaps=3, reconstruct=True),
            {"swap_search", "swap_apply", "obs_sweep"},  # fixed mask: no block_prune_mask
        ),
        (lambda W, H: fp.wanda_layer(W, H), set()),
        (lambda W, H: fp.magnitude_layer(W), set()),
    ],
)
def test_every_result_names_the_kernels_that_ran(gen, solve, expected):
    W, H = _layer(gen)
    r = solve(W, H)
    assert set(r.info["kernels"]) <= set(OPS)
    if r.info.get("swaps") == 0:  # no improving swap: swap_apply never ran
        expected = expected - {"swap_apply"}
    assert set(r.info["kernels"]) == expected, r.info["kernels"]
    assert all(v == "torch" for v in r.info["kernels"].values())  # CPU + backend auto
    assert "kernel_fallbacks" not in r.info
    for op in r.info["kernels"]:
        assert f"{op}:torch" in r.summary()


def test_fixed_mask_with_nm_is_pruned_exactly(gen):
    """A fixed N:M mask is pruned as given (the sweep must not choose its own N:M mask)."""
    W, H = _layer(gen)
    keep = torch.ones_like(W, dtype=torch.bool).reshape(12, 8, 4)
    idx = torch.rand(12, 8, 4, generator=gen).argsort(-1)[..., :2]
    keep.scatter_(-1, idx, False)
    keep = keep.reshape(12, 32)
    r = fp.sparsegpt_layer(W, H, mask=keep, prune_n=2, prune_m=4)
    assert torch.equal(r.mask, keep)
    assert bool((r.weight[~keep] == 0).all())


def test_report_lists_kernels():
    model = tiny_model("llama")
    report = fp.prune_model(model, calib_ids(), method="sparsegpt", progress=False)
    assert report.kernels() == {"block_prune_mask": "torch", "obs_sweep": "torch"}
    assert "kernels: block_prune_mask=torch, obs_sweep=torch" in report.summary()
