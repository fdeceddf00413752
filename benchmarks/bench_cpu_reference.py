"""CPU: fastprune's torch path against the research scripts' column loops on the same layer.

The target: the reference path must not be slower than the original code.
Times whole solves (inverse + sweep + trailing updates) of sparsegpt_layer / rose_layer
and gptq_layer (int4, groups of 128, symmetric) with backend="torch" against
`fastprune.original` (the IST-DASLab SparseGPT / GPTQ and ROSE loops restated),
same inputs: `benchmarks.bench_obs_sweep`'s layer solves, on the CPU and the torch backend
only, with the thread count in every row.

    python -m benchmarks.bench_cpu_reference [--quick] [--out benchmarks/results/cpu_reference]
"""

from __future__ import annotations

import argparse

import torch

import fastprune as fp
from benchmarks.bench_obs_sweep import solve_rows
from benchmarks.harness import bench, layer, ratio, row, shapes_arg, write_rows
from fastprune.original import original_gptq


def gptq_rows(W, H, blocksize: int, warmup: int, rep: int) -> list[dict]:
    """`gptq_layer` (int4, groups of 128, symmetric) against the restated GPTQ loop, whose
    blocks are `blocksize` columns (its default 128: the same sweep as fastprune's)."""

    def orig():
        return original_gptq(W, H, 4, 128, True, False, blocksize=blocksize)

    def ours():
        return fp.gptq_layer(W, H, 4, 128, True, blocksize=blocksize, backend="torch")

    t_orig = bench(orig, "cpu", warmup=warmup, rep=rep)
    t_ours = bench(ours, "cpu", warmup=warmup, rep=rep)
    common = {"pattern": "w4a16 g128", "blocksize": blocksize}
    return [
        row("gptq_layer", "original", tuple(W.shape), W.dtype, "cpu", t_orig, **common),
        row(
            "gptq_layer", "torch", tuple(W.shape), W.dtype, "cpu", t_ours, **common,
            speedup_vs_original=ratio(t_orig, t_ours),
        ),
    ]  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes only (256x512)")
    ap.add_argument(
        "--shapes",
        type=shapes_arg,
        default=None,
        help="ROWSxCOLS,... (default 1024x1024,4096x4096)",
    )
    ap.add_argument("--patterns", default="unstructured,2:4", help="unstructured and/or N:M")
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--no-gptq", action="store_true", help="skip the gptq_layer rows")
    ap.add_argument("--rep", type=int, default=3, help="timed calls (one from 4096x4096 on)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.csv")
    args = ap.parse_args(argv)
    shapes = args.shapes or ([(256, 512)] if args.quick else [(1024, 1024), (4096, 4096)])
    out = []
    for rows, cols in shapes:
        W, H = layer(rows, cols, "cpu", args.seed)
        big = rows * cols >= 4096 * 4096
        out += solve_rows(
            W,
            H,
            "cpu",
            ["torch"],
            args.patterns.split(","),
            args.blocksize,
            warmup=0 if big else 1,
            rep=1 if big else args.rep,
        )
        if not args.no_gptq:
            out += gptq_rows(W, H, args.blocksize, 0 if big else 1, 1 if big else args.rep)
    for r in out:
        r["threads"] = torch.get_num_threads()
    write_rows(out, args.out)


if __name__ == "__main__":
    main()
