"""SparseSwaps' per-layer error reduction over its Wanda warm start on a real model's layers.

Hessians come from the dense model's own activations on the built-in calibration text
(hooks on the chosen blocks' linears); each layer is then pruned with Wanda and refined with
SparseSwaps (same Hessian), and the reduction of `tr(D H D^T)` is reported per layer.

    python -m benchmarks.quality_swaps_real [--blocks 0,15] [--max-swaps 10] [--out ...]
"""

from __future__ import annotations

import argparse
import time

import torch

import fastprune as fp
from benchmarks.harness import dense_layer_hessians, row, write_rows
from fastprune.data import get_calibration
from fastprune.models import get_weight
from fastprune.timing import Timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="0,15")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-swaps", type=int, default=10)
    ap.add_argument("--pattern", default="50%", help="50%% or N:M")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n, m = (0, 0) if args.pattern.endswith("%") else map(int, args.pattern.split(":"))
    model, tok = fp.load_model(args.model)
    calib = get_calibration("builtin", tok, args.nsamples, args.seqlen, seed=0)
    blocks = [int(x) for x in args.blocks.split(",")]
    accs = dense_layer_hessians(model, calib, blocks)
    out = []
    for key, (acc, lin) in accs.items():
        W = get_weight(lin).detach().float().to(args.device)
        H = acc.H.to(args.device)
        t = time.perf_counter()
        r = fp.sparseswaps_layer(W, H, sparsity=0.5, prune_n=n, prune_m=m, max_swaps=args.max_swaps)
        secs = time.perf_counter() - t
        i = r.info
        red = 100 * (1 - i["loss_after"] / i["loss_before"])
        print(
            f"{key:<24}{str(tuple(W.shape)):<14} wanda {i['loss_before']:.5g} -> swaps "
            f"{i['loss_after']:.5g}  ({red:.1f}% lower, {i['swaps']} swaps, {i['steps']} steps)"
        )
        out.append(
            row(
                "sparseswaps_quality",
                i["kernels"].get("swap_search", i["backend"]),
                tuple(W.shape),
                W.dtype,
                args.device,
                Timing.once(secs * 1e3),
                layer=key,
                pattern=args.pattern,
                loss_wanda=i["loss_before"],
                loss_swaps=i["loss_after"],
                reduction_pct=round(red, 2),
                swaps=i["swaps"],
                steps=i["steps"],
                max_swaps=args.max_swaps,
                model=args.model,
                nsamples=args.nsamples,
                seqlen=args.seqlen,
            )
        )
    write_rows(out, args.out)


if __name__ == "__main__":
    main()
