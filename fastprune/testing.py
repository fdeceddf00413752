"""Synthetic layers for tests and benchmarks: weights, activations and their Hessian."""

from __future__ import annotations

import torch

from .hessian import HessianAccumulator


def random_layer(
    rows: int,
    cols: int,
    *,
    nsamples: int = 4,
    tokens: int = 64,
    columnar: bool = False,
    ill_conditioned: bool = False,
    dead: int = 0,
    blocksize: int = 128,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    device: str = "cpu",
):
    """`(W, H, X)` with LLM-like activations `X [nsamples, tokens, cols]`.

    columnar: per-block activation scales spread over two decades, so ROSE's block losses
    have a large relative range and it reorders. ill_conditioned: activations of rank well
    below `cols` (H singular before damping). dead: that many input channels always zero.
    """
    g = generator
    scale = torch.rand(cols, generator=g) + 0.1
    scale[torch.randperm(cols, generator=g)[: max(1, cols // 64)]] *= 20  # outlier channels
    if columnar:
        nb = (cols + blocksize - 1) // blocksize
        # two decades between the quietest and the loudest block, in random block order
        block_scale = 10 ** torch.linspace(-1, 1, nb)[torch.randperm(nb, generator=g)]
        scale = scale * block_scale.repeat_interleave(blocksize)[:cols]
    if ill_conditioned:
        rank = max(1, cols // 4)
        basis = torch.randn(rank, cols, generator=g)
        X = torch.randn(nsamples, tokens, rank, generator=g) @ basis
        X = X * scale
    else:
        X = torch.randn(nsamples, tokens, cols, generator=g) * scale
    if dead:
        X[..., torch.randperm(cols, generator=g)[:dead]] = 0
    W = torch.randn(rows, cols, generator=g) * 0.05
    acc = HessianAccumulator(cols)
    acc.add_batch(X)
    return W.to(device=device, dtype=dtype), acc.H.to(device), X.to(device)
