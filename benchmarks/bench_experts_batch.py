"""MoE experts: SparseGPT on E same-shaped layers, one by one (`sparsegpt_layer`) against one
batch (`sparsegpt_experts`), and their inverses (`inverse_hessian` per expert against
`inverse_hessians`). The pipeline batches where this says it pays
(`fastprune.methods.BATCH_MAX_ENTRIES` on CPU).

    python -m benchmarks.bench_experts_batch --device cpu --out benchmarks/results/experts_batch_cpu
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import bench, ratio, row, write_rows
from fastprune.hessian import inverse_hessian
from fastprune.solvers.sparsegpt import sparsegpt_layer
from fastprune.solvers.sparsegpt_batched import inverse_hessians, sparsegpt_experts

# experts, rows, cols: tiny experts, Qwen3-30B-A3B's down_proj and gate_up_proj
CASES = [(64, 64, 256), (16, 2048, 768), (16, 1536, 2048)]


def experts(E: int, rows: int, cols: int, device, tokens: int = 512):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(E, rows, cols, generator=g)
    X = torch.randn(E, tokens, cols, generator=g)
    H = 2 / tokens * X.transpose(1, 2) @ X
    return W.to(device), H.to(device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write OUT.json / OUT.csv")
    args = ap.parse_args(argv)
    # one by one with the kernels the batch uses: torch's on CPU, the fused ones on a GPU
    # (where the batch launches the fused obs_sweep over the experts)
    backend = "torch" if args.device == "cpu" else "auto"
    rows = []
    for E, r, c in CASES:
        W, H = experts(E, r, c, args.device)
        shape = f"{E}x({r}x{c})"
        one = bench(
            lambda: [sparsegpt_layer(W[e], H[e], backend=backend) for e in range(E)],
            args.device,
            rep=1,
        )
        both = bench(lambda: sparsegpt_experts(W, H, backend=backend), args.device, rep=1)
        inv_one = bench(lambda: [inverse_hessian(H[e]) for e in range(E)], args.device, rep=1)
        inv_both = bench(lambda: inverse_hessians(H), args.device, rep=1)
        rows += [
            row("sparsegpt_experts", backend, shape, W.dtype, args.device, one, mode="one by one"),
            row(
                "sparsegpt_experts",
                backend,
                shape,
                W.dtype,
                args.device,
                both,
                mode="batched",
                speedup_vs_one_by_one=ratio(one, both),
            ),
            row(
                "inverse_hessians", "torch", shape, H.dtype, args.device, inv_one, mode="one by one"
            ),
            row(
                "inverse_hessians",
                "torch",
                shape,
                H.dtype,
                args.device,
                inv_both,
                mode="batched",
                speedup_vs_one_by_one=ratio(inv_one, inv_both),
            ),
        ]
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
