"""CPU: fastprune's torch path vs the research scripts' column loop on the same layer.

The contract (DESIGN §5): the reference path must not be slower than the original code.
Times whole solves (inverse + sweep + trailing updates) of sparsegpt_layer / rose_layer
against `fastprune.original` (the IST-DASLab / ROSE loops restated), same inputs.

    python benchmarks/bench_cpu_reference.py [--quick] [--out benchmarks/results/cpu_reference]
"""

from __future__ import annotations

import argparse

import torch

import fastprune as fp
from benchmarks.harness import bench, row, write_rows
from fastprune.original import original_rose, original_sparsegpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--shapes", default=None, help="comma list of RxC, e.g. 1024x1024")
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = ["256x512"] if args.quick else ["1024x1024", "4096x4096"]
    if args.shapes:
        shapes = args.shapes.split(",")
    torch.manual_seed(0)
    rows_out = []
    for shape in shapes:
        r, c = (int(x) for x in shape.split("x"))
        W, H, _ = fp.testing.random_layer(r, c, nsamples=8, tokens=max(64, c // 4))
        scaler = torch.diagonal(H) / 2
        cases = [
            ("sparsegpt", "unstructured", 0, 0),
            ("sparsegpt", "2:4", 2, 4),
            ("rose", "unstructured", 0, 0),
        ]
        for method, pat, n, m in cases:
            if method == "sparsegpt":
                ours = lambda: fp.sparsegpt_layer(W, H, 0.5, n, m, backend="torch")  # noqa: E731
                orig = lambda: original_sparsegpt(W, H, 0.5, n, m)  # noqa: E731
            else:
                ours = lambda: fp.rose_layer(W, H, 0.5, n, m, backend="torch")  # noqa: E731
                orig = lambda: original_rose(W, H, scaler, 0.5, n, m)  # noqa: E731
            rep = 1 if r * c >= 4096 * 4096 else args.rep
            t_orig = bench(orig, "cpu", warmup=0 if rep == 1 else 1, rep=rep)
            t_ours = bench(ours, "cpu", warmup=0 if rep == 1 else 1, rep=rep)
            for backend, t in (("original-loop", t_orig), ("fastprune-torch", t_ours)):
                rows_out.append(
                    row(
                        f"{method}_layer",
                        backend,
                        (r, c),
                        torch.float32,
                        "cpu",
                        t,
                        pattern=pat,
                        speedup_vs_original=round(t_orig / t, 2),
                        threads=torch.get_num_threads(),
                    )
                )
    write_rows(rows_out, args.out)


if __name__ == "__main__":
    main()
