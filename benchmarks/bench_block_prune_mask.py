"""SparseGPT's unstructured block mask: every backend's `block_prune_mask` on one block of
`blocksize` columns (the unit each solve calls it on, cols / blocksize times per layer)
against the original's full sort of the block.

Rows (per layer shape; the shape column is the block's, rows x blocksize):
  * `block_prune_mask` backend `original`: the IST-DASLab script's
    `sorted(w^2 / d^2)[int(numel * sparsity)]` threshold and `<=` rule;
  * `block_prune_mask` on each backend with its own (`fastprune.ops.get_op`): `gbps` as one
    read of the block over the time, `speedup_vs_original`, `per_layer_ms` (x the blocks).

    python -m benchmarks.bench_block_prune_mask              # LLaMA-7B shapes on the GPU
    python -m benchmarks.bench_block_prune_mask --quick      # small CPU smoke run
"""

from __future__ import annotations

import torch

import fastprune as fp
from benchmarks.bench_obs_sweep import FULL_SHAPES, QUICK_SHAPES
from benchmarks.harness import (
    arg_parser,
    bench,
    ratio,
    row,
    run_layers,
    sig,
    time_op,
)


def parser():
    p = arg_parser(__doc__, FULL_SHAPES, QUICK_SHAPES, patterns=None)
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    return p


def original_block_keep(W1: torch.Tensor, d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The original loop's block mask (`fastprune.original.original_sparsegpt`), as a keep-mask."""
    tmp = W1**2 / d.reshape(1, -1) ** 2
    thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
    return tmp > thresh


def mask_rows(W, H, device, backends, blocksize: int, sparsity: float) -> list[dict]:
    out = []
    count = min(blocksize, W.shape[1])
    blocks = -(-W.shape[1] // count)
    W1 = W[:, :count]
    d = fp.inverse_hessian(H, 0.01).hinv.diagonal()[:count].contiguous()
    gb = W1.numel() * W1.element_size() / 1e9
    args = (W1, d, sparsity)
    common = {"sparsity": sparsity, "layer": "x".join(map(str, W.shape))}
    orig = bench(lambda: original_block_keep(*args), device)
    out.append(row("block_prune_mask", "original", W1.shape, W1.dtype, device, orig, **common))
    for be, t, _ in time_op("block_prune_mask", device, backends, args):
        out.append(
            row(
                "block_prune_mask",
                be,
                W1.shape,
                W1.dtype,
                device,
                t,
                **common,
                gbps=sig(gb / t.p50_ms * 1e3),
                per_layer_ms=sig(t.p50_ms * blocks),
                speedup_vs_original=ratio(orig, t),
            )
        )
    return out


def main(argv=None) -> None:
    run_layers(
        parser(),
        argv,
        lambda W, H, a: mask_rows(W, H, a.device, a.backends, a.blocksize, a.sparsity),
    )


if __name__ == "__main__":
    main()
