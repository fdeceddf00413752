"""Layer errors of recipe candidates on a real model's layers, relative to SparseGPT's.

Hessians come from the dense model's own activations on the built-in calibration text (hooks
on the chosen blocks' linears; k/v and up share q's and gate's inputs, so they are skipped);
each layer is solved by every candidate (`fastprune.compose_layer`) with SparseSwaps' CPU/GPU
step budget (`max_swaps="auto"`), and `tr(D H D^T)` is printed relative to SparseGPT's. This
is the cheap screen that chose which recipes `benchmarks.quality_recipes` runs end to end.

    python -m benchmarks.quality_recipe_layers [--blocks 0,14,28] [--patterns 50%,2:4]
"""

from __future__ import annotations

import argparse
import time

import torch

import fastprune as fp
from benchmarks.harness import dense_layer_hessians
from fastprune.data import get_calibration
from fastprune.methods import auto_max_swaps
from fastprune.models import get_weight
from fastprune.solvers.recipes import compose_layer

VARIANTS = {
    "sparsegpt": dict(select="sparsegpt"),
    "rose": dict(select="rose"),
    "sg+sw(orig)+rec": dict(
        select="sparsegpt", refine="sparseswaps", refine_on="original", reconstruct=True
    ),
    "sg+sw(rec)": dict(select="sparsegpt", refine="sparseswaps", refine_on="reconstructed"),
    "sg+sw(rec)+rec": dict(
        select="sparsegpt", refine="sparseswaps", refine_on="reconstructed", reconstruct=True
    ),
    "rose+sw(rec)": dict(
        select="rose", refine="sparseswaps", refine_on="reconstructed", reconstruct="best"
    ),
    "wanda+sw+rec": dict(select="wanda", refine="sparseswaps", reconstruct=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="0,14,28")
    ap.add_argument("--patterns", default="50%,2:4")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = fp.load_model(args.model)
    calib = get_calibration("builtin", tok, args.nsamples, args.seqlen, seed=0)
    blocks = [int(x) for x in args.blocks.split(",")]
    # k/v and up read q's and gate's inputs: the same H, so one of each group is enough
    accs = dense_layer_hessians(model, calib, blocks, skip=("k_proj", "v_proj", "up_proj"))
    for pat in args.patterns.split(","):
        n, m = (0, 0) if pat.endswith("%") else map(int, pat.split(":"))
        s = float(pat[:-1]) / 100 if pat.endswith("%") else n / m
        tot = dict.fromkeys(VARIANTS, 0.0)
        secs = dict.fromkeys(VARIANTS, 0.0)
        for key, (acc, lin) in accs.items():
            W, H = get_weight(lin).detach().float(), acc.H
            steps = auto_max_swaps(W.shape[0], W.shape[1], m, W.device)
            line, base = [key, str(tuple(W.shape)), f"steps={steps}"], None
            for v, kw in VARIANTS.items():
                t = time.perf_counter()
                r = compose_layer(W, H, sparsity=s, prune_n=n, prune_m=m, max_swaps=steps, **kw)
                secs[v] += time.perf_counter() - t
                base = r.loss if base is None else base
                tot[v] += r.loss / base
                line.append(f"{v}={r.loss / base:.4f}")
            print(" ".join(line), flush=True)
        means = {k: round(v / len(accs), 4) for k, v in tot.items()}
        print(pat, means, {k: round(v, 1) for k, v in secs.items()}, flush=True)


if __name__ == "__main__":
    main()
