"""Layer errors of recipe candidates on a real model's layers, relative to SparseGPT's, on
the calibration text and on texts it never saw.

Hessians come from the dense model's own activations on the built-in calibration text (hooks
on the chosen blocks' linears; k/v and up share q's and gate's inputs, so they are skipped);
each layer is solved by every candidate (`fastprune.compose_layer`, or a solver of its own:
the ADMM lever) with SparseSwaps' CPU/GPU
step budget (`max_swaps="auto"`, capped by `--max-swaps`), and `tr(D H D^T)` is printed
relative to SparseGPT's, under the calibration H and under the H of each `--transfer` text
(the dense model's activations on that text: the layer's error on another domain, with the
same weights). `sparsegpt+lstsq/held-out-damp` chooses each layer's damping on a held-out
quarter of the calibration windows (`--held-out`). This is the cheap screen that chooses
which recipes `benchmarks.quality_recipes` runs end to end.

    python -m benchmarks.quality_recipe_layers [--blocks 0,14,28] [--patterns 50%,2:4]
"""

from __future__ import annotations

import argparse
import time

import torch

import fastprune as fp
from benchmarks.admm_lever import admm_layer
from benchmarks.harness import dense_layer_hessians
from fastprune.data import get_calibration, read_text_file, sample_windows, tokenize
from fastprune.hessian import layer_loss
from fastprune.methods import auto_max_swaps
from fastprune.models import get_weight
from fastprune.solvers.recipes import compose_layer
from fastprune.solvers.recipes import held_out_damping as held_out_damping_layer
from fastprune.solvers.refit import refit_masked


def _swaps(select: str, **kw) -> dict:
    return dict(select=select, refine="sparseswaps", refine_on="reconstructed", **kw)


VARIANTS = {
    "sparsegpt": dict(select="sparsegpt"),
    "rose": dict(select="rose"),
    "sg+sw(orig)+rec": dict(
        select="sparsegpt", refine="sparseswaps", refine_on="original", reconstruct=True
    ),
    "sg+sw(rec)": _swaps("sparsegpt"),
    "sg+sw(rec)+rec": _swaps("sparsegpt", reconstruct=True),
    "sg+sw(rec)+best": _swaps("sparsegpt", reconstruct="best"),  # the recipe, unstructured
    "sg+sw(rec)+best/damp0.1": _swaps("sparsegpt", reconstruct="best", percdamp=0.1),
    "rose+sw(rec)": _swaps("rose"),
    "rose+sw(rec)+rec": _swaps("rose", reconstruct=True),  # OBS in ROSE's order on its mask
    "rose+sw(rec)+best": _swaps("rose", reconstruct="best"),  # the recipe, N:M
    "rose+sw(rec)+best/damp0.1": _swaps("rose", reconstruct="best", percdamp=0.1),
    "wanda+sw+rec": dict(select="wanda", refine="sparseswaps", reconstruct=True),
    # the least-squares weights on the selector's mask (the recipe: SparseGPT's unstructured,
    # ROSE's for N:M) and after the swaps
    "sparsegpt+lstsq": dict(select="sparsegpt", reconstruct="lstsq"),
    "rose+lstsq": dict(select="rose", reconstruct="lstsq"),
    "rose+sw(rec)+lstsq": _swaps("rose", reconstruct="lstsq"),
    # levers on the refit: fewer CG iterations, more damping; ADMM's mask with the refit
    "sparsegpt+lstsq/iters8": dict(select="sparsegpt", reconstruct="lstsq", refit_iters=8),
    "sparsegpt+lstsq/damp0.05": dict(select="sparsegpt", reconstruct="lstsq", percdamp=0.05),
    "admm": lambda W, H, s, n, m: admm_layer(W, H, s, n, m),
    # the damping chosen per layer on a held-out slice of the calibration windows: each level
    # solves on the other windows' H and is scored under the held-out windows' H; the chosen
    # level then solves on the whole H
    "sparsegpt+lstsq/held-out-damp": "held-out",
    # cheaper forms: three levels scored after 8 CG iterations; or the mask kept at 1% and
    # only the refit's damping chosen
    "sparsegpt+lstsq/held-out-damp3/iters8": (
        "held-out",
        dict(levels=(0.01, 0.05, 0.1), select_iters=8),
    ),
    "sparsegpt+lstsq/held-out-refit-damp3/iters8": (
        "held-out",
        dict(levels=(0.01, 0.05, 0.1), select_iters=8, refit_only=True),
    ),
    # weights blended between the least-squares refit and SparseGPT's own OBS weights on the
    # same mask: `a * lstsq + (1 - a) * obs`
    "sparsegpt+lstsq/blend0.5": lambda W, H, s, n, m: blended(W, H, s, n, m, 0.5),
    "sparsegpt+lstsq/blend0.75": lambda W, H, s, n, m: blended(W, H, s, n, m, 0.75),
}
# the levels the held-out choice tries (the damping's fraction of mean(diag H))
HELD_OUT_DAMPING = (0.01, 0.02, 0.05, 0.1, 0.2)


def blended(W, H, s, n, m, a):
    """`a` times the recipe's least-squares weights plus `1 - a` times SparseGPT's OBS weights,
    both on SparseGPT's mask."""
    opts = dict(sparsity=s, prune_n=n, prune_m=m, select="sparsegpt")
    obs = compose_layer(W, H, **opts)
    ls = compose_layer(W, H, reconstruct="lstsq", **opts)
    assert torch.equal(obs.mask, ls.mask)
    return fp.PruneResult(a * ls.weight + (1 - a) * obs.weight, ls.mask, None, {})


def held_out_damping(
    W, H_fit, H_held, H, s, n, m, *, levels=HELD_OUT_DAMPING, select_iters=32,
    refit_only=False,
):  # fmt: skip
    """The recipe's layer solve (SparseGPT's mask, the least-squares weights) at the damping
    level of `levels` whose solve on `H_fit` (refit of `select_iters` CG iterations) has the
    lowest loss under `H_held`: the package's `held_out_damping`; returns (the solve on `H`
    at that level, the level). With `refit_only`, the mask keeps SparseGPT's 1% and only the
    refit's damping is chosen."""
    pat = dict(sparsity=s, prune_n=n, prune_m=m)
    if not refit_only:
        r = held_out_damping_layer(W, H, s, n, m, levels, (H_fit, H_held), select="sparsegpt",
                                   reconstruct="lstsq", trial_iters=select_iters)  # fmt: skip
        return r, r.info["percdamp_chosen"]
    sel = compose_layer(W, H_fit, select="sparsegpt", **pat)
    scores = {
        d: layer_loss(W, refit_masked(W, H_fit, sel.mask, sel.weight, percdamp=d,
                                      iters=select_iters)[0], H_held)
        for d in levels
    }  # fmt: skip
    best = min(scores, key=scores.get)
    sel = compose_layer(W, H, select="sparsegpt", **pat)
    weight, _ = refit_masked(W, H, sel.mask, sel.weight, percdamp=best)
    return fp.PruneResult(weight, sel.mask, None, {}), best


TRANSFER = {"gpl3": "/usr/share/common-licenses/GPL-3", "code": argparse.__file__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="0,14,28")
    ap.add_argument("--patterns", default="50%,2:4")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    ap.add_argument("--max-swaps", type=int, default=16, help="cap on the swap steps")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument(
        "--held-out", type=float, default=0.25,
        help="fraction of the calibration windows the held-out damping choice scores on",
    )  # fmt: skip
    ap.add_argument(
        "--transfer", default="gpl3,code", help="other texts (names or name=path); '' for none"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = fp.load_model(args.model)
    calib = get_calibration("builtin", tok, args.nsamples, args.seqlen, seed=args.seed)
    blocks = [int(x) for x in args.blocks.split(",")]
    # k/v and up read q's and gate's inputs: the same H, so one of each group is enough
    skip = ("k_proj", "v_proj", "up_proj")
    accs = dense_layer_hessians(model, calib, blocks, skip=skip)
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    split = {}
    if any(v == "held-out" or isinstance(v, tuple) for v in variants.values()):
        k = max(1, round(args.nsamples * args.held_out))
        fit = dense_layer_hessians(model, calib[:-k], blocks, skip=skip)
        held = dense_layer_hessians(model, calib[-k:], blocks, skip=skip)
        split = {key: (fit[key][0].H, held[key][0].H) for key in accs}
    others = {}
    for item in filter(None, args.transfer.split(",")):
        name, _, path = item.partition("=")
        ids = tokenize(tok, read_text_file(path or TRANSFER[name], "transfer"))
        windows = sample_windows(ids, args.nsamples, args.seqlen, 0)
        others[name] = dense_layer_hessians(model, windows, blocks, skip=skip)
    for pat in args.patterns.split(","):
        n, m = (0, 0) if pat.endswith("%") else map(int, pat.split(":"))
        s = float(pat[:-1]) / 100 if pat.endswith("%") else n / m
        texts = ["calib", *others]
        tot = {(v, t): 0.0 for v in variants for t in texts}
        secs = dict.fromkeys(variants, 0.0)
        for key, (acc, lin) in accs.items():
            W, H = get_weight(lin).detach().float(), acc.H
            Hs = {"calib": H} | {t: others[t][key][0].H for t in others}
            steps = min(args.max_swaps, auto_max_swaps(W.shape[0], W.shape[1], m, W.device))
            base = None
            line = [key, str(tuple(W.shape)), f"steps={steps}"]
            for v, kw in variants.items():
                t0 = time.perf_counter()
                if kw == "held-out" or isinstance(kw, tuple):
                    how = kw[1] if isinstance(kw, tuple) else {}
                    r, level = held_out_damping(W, *split[key], H, s, n, m, **how)
                    line.append(f"level={level}")
                elif callable(kw):  # a layer solver of its own (W, H, sparsity, n, m)
                    r = kw(W, H, s, n, m)
                else:
                    r = compose_layer(W, H, sparsity=s, prune_n=n, prune_m=m, max_swaps=steps, **kw)
                secs[v] += time.perf_counter() - t0
                losses = {t: layer_loss(W, r.weight.float(), Ht) for t, Ht in Hs.items()}
                base = losses if base is None else base
                for t in texts:
                    tot[(v, t)] += losses[t] / base[t]
                line.append(v + "=" + "/".join(f"{losses[t] / base[t]:.4f}" for t in texts))
            print(" ".join(line), flush=True)
        print(f"{pat}: mean over {len(accs)} layers, relative to {next(iter(variants))} "
              f"({' / '.join(texts)}), solve seconds", flush=True)  # fmt: skip
        for v in variants:
            rel = " / ".join(f"{tot[(v, t)] / len(accs):.4f}" for t in texts)
            print(f"  {v:28s} {rel}  {secs[v]:.1f} s", flush=True)


if __name__ == "__main__":
    main()
