"""The least-squares refit on a fixed mask (`refit_masked`) against SparseGPT's OBS
reconstruction on the same mask: time and the layer loss each leaves.

Rows per (shape, pattern), the mask being SparseGPT's own:
  * `obs_reconstruct` backend `torch`: `sparsegpt_layer(W, H, mask=...)` (inverse and OBS
    sweep), `loss_vs_obs` 1;
  * `refit` backend `torch`, one row per `--iters`: batched PCG from the OBS weights,
    `gflops` from its counted work (one `rows x cols x cols` GEMM, 2 flops a multiply-add,
    per iteration), `loss_vs_obs` the layer loss `tr(D H D^T)` it leaves over OBS's and
    `residual` the largest relative residual left.
The layers are synthetic (`random_layer`, outlier channels); on real layers of SmolLM2-135M
the refit left 0.43-0.82 of ROSE's loss at 2:4 (docs/recipes.md).

    python -m benchmarks.bench_refit                   # 4096x4096, 4096x11008, 11008x4096
    python -m benchmarks.bench_refit --quick           # small smoke run
"""

from __future__ import annotations

import torch

from benchmarks.harness import arg_parser, bench, pattern, row, run_layers, sig
from fastprune.hessian import layer_loss
from fastprune.solvers.refit import refit_masked
from fastprune.solvers.sparsegpt import sparsegpt_layer

FULL = [(4096, 4096), (4096, 11008), (11008, 4096)]
QUICK = [(256, 384), (129, 256)]


def parser():
    p = arg_parser(__doc__, FULL, QUICK)
    p.add_argument("--iters", default="16,32", help="comma list of PCG iteration counts")
    return p


def refit_rows(W: torch.Tensor, H: torch.Tensor, args) -> list[dict]:
    out: list[dict] = []
    rows, cols = W.shape
    for name in args.patterns:
        n, m = pattern(name)
        sg = sparsegpt_layer(W, H, prune_n=n, prune_m=m)
        obs_t = bench(
            lambda: sparsegpt_layer(W, H, prune_n=n, prune_m=m, mask=sg.mask), args.device
        )
        out.append(row("obs_reconstruct", "torch", W.shape, W.dtype, args.device, obs_t,
                       pattern=name, loss_vs_obs=1.0))  # fmt: skip
        for iters in (int(x) for x in args.iters.split(",")):
            t = bench(lambda: refit_masked(W, H, sg.mask, sg.weight, iters=iters), args.device)
            x, info = refit_masked(W, H, sg.mask, sg.weight, iters=iters)
            flops = 2 * rows * cols * cols * max(1, info["refit_iters"])
            out.append(
                row(
                    "refit",
                    "torch",
                    W.shape,
                    W.dtype,
                    args.device,
                    t,
                    pattern=name,
                    iters=info["refit_iters"],
                    gflops=sig(flops / t.p50_ms / 1e6),
                    loss_vs_obs=sig(layer_loss(W, x, H) / sg.loss, 4),
                    residual=sig(info["refit_residual"], 3),
                )  # fmt: skip
            )
    return out


def main(argv=None) -> None:
    run_layers(parser(), argv, refit_rows)


if __name__ == "__main__":
    main()
