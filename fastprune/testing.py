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
    The numbers are drawn on `generator`'s device (a CUDA generator builds a large layer on
    the GPU; the default, on the CPU) and the results moved to `device`.
    """
    g = generator
    on = {"generator": g, "device": g.device if g is not None else "cpu"}
    scale = torch.rand(cols, **on) + 0.1
    scale[torch.randperm(cols, **on)[: max(1, cols // 64)]] *= 20  # outlier channels
    if columnar:
        nb = (cols + blocksize - 1) // blocksize
        # two decades between the quietest and the loudest block, in random block order
        block_scale = 10 ** torch.linspace(-1, 1, nb, device=on["device"])
        block_scale = block_scale[torch.randperm(nb, **on)]
        scale = scale * block_scale.repeat_interleave(blocksize)[:cols]
    if ill_conditioned:
        rank = max(1, cols // 4)
        basis = torch.randn(rank, cols, **on)
        X = torch.randn(nsamples, tokens, rank, **on) @ basis
        X = X * scale
    else:
        X = torch.randn(nsamples, tokens, cols, **on) * scale
    if dead:
        X[..., torch.randperm(cols, **on)[:dead]] = 0
    W = torch.randn(rows, cols, **on) * 0.05
    acc = HessianAccumulator(cols, device=on["device"])
    acc.add_batch(X)
    return W.to(device=device, dtype=dtype), acc.H.to(device), X.to(device)
