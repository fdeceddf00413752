"""ROSE's column losses: every backend's `column_losses` against the original per-block sorts
and one read of the scores at memory bandwidth.

Rows (per shape and pattern; the scores are ROSE's `S = |W| * sqrt(diag(H)/2)`):
  * `read_scores` (torch): `S.sum()`, one read of S (target: within 2x of it);
  * `column_losses` backend `original`: the ROSE script's per-block sorts
    (`fastprune.original._rose_block_losses`; unstructured only, as in the original);
  * `column_losses` on each backend with its own (`fastprune.ops.get_op`):
    `speedup_vs_original`, `x_read`, and `gbps` as one read of S over the time.

    python -m benchmarks.bench_column_losses                 # LLaMA-7B shapes on the GPU
    python -m benchmarks.bench_column_losses --quick         # small CPU smoke run
    python -m benchmarks.bench_column_losses --out benchmarks/results/column_losses_h100
"""

from __future__ import annotations

import torch

from benchmarks.bench_obs_sweep import FULL_SHAPES, QUICK_SHAPES
from benchmarks.harness import (
    arg_parser,
    bench,
    pattern,
    ratio,
    row,
    run_layers,
    sig,
    time_op,
)
from fastprune.original import _rose_block_losses
from fastprune.solvers.obs import block_bounds


def parser():
    p = arg_parser(__doc__, FULL_SHAPES, QUICK_SHAPES)
    p.add_argument("--blocksize", type=int, default=128)
    return p


def loss_rows(S: torch.Tensor, device, backends, patterns, blocksize: int) -> list[dict]:
    out = []
    rows, cols = S.shape
    bounds = block_bounds(cols, blocksize)
    gb = S.numel() * S.element_size() / 1e9
    read = bench(lambda: S.sum(), device)
    out.append(
        row(
            "read_scores", "torch", S.shape, S.dtype, device, read, gbps=sig(gb / read.p50_ms * 1e3)
        )
    )
    for pname in patterns:
        n, m = pattern(pname)
        common = {"pattern": pname, "blocksize": blocksize if not n else m}
        orig = None
        if not n:
            orig = bench(lambda: _rose_block_losses(S, cols, blocksize, 0.5), device)
            out.append(
                row(
                    "column_losses",
                    "original",
                    S.shape,
                    S.dtype,
                    device,
                    orig,
                    **common,
                    x_read=ratio(orig, read),
                )
            )
        args = (S, bounds, 0.5, n, m)
        for be, t, _ in time_op("column_losses", device, backends, args, pname):
            out.append(
                row(
                    "column_losses",
                    be,
                    S.shape,
                    S.dtype,
                    device,
                    t,
                    **common,
                    gbps=sig(gb / t.p50_ms * 1e3),
                    x_read=ratio(t, read),
                    speedup_vs_original=ratio(orig, t) if orig else None,
                )
            )
    return out


def main(argv=None) -> None:
    def rows_of(W, H, a):
        S = W.abs() * torch.sqrt(torch.diagonal(H) / 2).reshape(1, -1)  # ROSE's scores
        return loss_rows(S, a.device, a.backends, a.patterns, a.blocksize)

    run_layers(parser(), argv, rows_of, tokens=256)


if __name__ == "__main__":
    main()
