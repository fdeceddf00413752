"""SparseSwaps step benchmark: Triton swap search/apply against chunked PyTorch.

A step = `swap_search` over all rows + `swap_apply` for the swapping rows (the first step of
a run, every row active, is the most expensive one). Rows: per-step ms, pairs/s and achieved
FLOP/s from counted work against a float32 FMA peak (`--peak-tflops`, default H100 SXM 67).

Counted work: the search evaluates every (u, p) pair of a row densely (masks differ per row,
so a tile of H can only be shared by rows if it is dense): `evaluated = rows * cols^2`
(N:M: `rows * cols * m`), of which `candidates = sum_rows kept * pruned` (N:M: per group)
are legal. FLOPs = 4 per evaluated pair (Δ = a_u + b_p + x_u * H_up * y_p: two multiplies,
two adds; per-row terms are O(cols) and the min compare is not counted). The N:M search is
memory bound (cols*m pairs per row), so its rows also give GB/s for reading w, c, keep.

Backends: `triton` (fastprune.triton_kernels.swap_search), `torch_ref` (the reference
`torch_swap_search`, chunked over rows and u) and `torch_fast`, a chunked variant written for
this benchmark: the per-row terms are folded as in the kernel and the `[R, cols, cols]` chunk
is built with one broadcast multiply plus two in-place passes (mul_, add_) and reduced over p
then u, instead of the reference's five temporaries; it returns the same (u, p, Δ).

    python benchmarks/bench_swaps.py                      # GPU: 4096x4096, 11008x4096
    python benchmarks/bench_swaps.py --quick              # small CPU smoke (interpreter)
    python benchmarks/bench_swaps.py --sweep              # GPU: tile configurations
    python benchmarks/bench_swaps.py --quality            # error reduction over Wanda
    python benchmarks/bench_swaps.py --out benchmarks/results/swaps_h100
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton on CPU runs through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastprune.ops.torch_ref import (  # noqa: E402
    _swap_terms,
    torch_swap_apply,
    torch_swap_search,
)

import fastprune as fp  # noqa: E402
from benchmarks.harness import bench, row, write_rows  # noqa: E402
from fastprune.testing import random_layer  # noqa: E402

FLOPS_PER_PAIR = 4


def _sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (keeps tiny CPU rates readable)."""
    return float(f"{x:.{digits}g}")


def torch_swap_search_fast(w, keep, c, H, prune_n=0, prune_m=0, budget=1 << 25):
    """Chunked PyTorch swap search with fewer passes than the reference (same contract)."""
    if prune_n:  # the reference N:M search is already one vectorised pass per row chunk
        return torch_swap_search(w, keep, c, H, prune_n, prune_m)
    rows, cols = w.shape
    a, b = _swap_terms(w, keep, c, H.diagonal())
    x = torch.where(keep, -2 * w, 0.0)
    y = torch.where(keep, 0.0, w)
    best = torch.empty(rows, dtype=w.dtype, device=w.device)
    best_u = torch.empty(rows, dtype=torch.long, device=w.device)
    best_p = torch.empty(rows, dtype=torch.long, device=w.device)
    tile_r = max(1, budget // (cols * cols))
    for r0 in range(0, rows, tile_r):
        r1 = min(rows, r0 + tile_r)
        T = H[None] * y[r0:r1, None, :]  # [R, U, P]
        T.mul_(x[r0:r1, :, None]).add_(b[r0:r1, None, :])
        v, pidx = T.min(dim=2)  # [R, U]
        del T
        v += a[r0:r1]
        val, uidx = v.min(dim=1)
        best[r0:r1] = val
        best_u[r0:r1] = uidx
        best_p[r0:r1] = pidx.gather(1, uidx[:, None])[:, 0]
    return best_u, best_p, best


def _layer(rows, cols, device, gen):
    """A random LLM-like layer (H from outlier-heavy activations) and its Wanda warm start."""
    W, H, _ = random_layer(rows, cols, nsamples=2, tokens=256, generator=gen)
    return W.to(device), H.to(device)


def _work(keep, n, m):
    rows, cols = keep.shape
    if n:
        kept = keep.reshape(rows, -1, m).sum(-1).double()
        cand = (kept * (m - kept)).sum().item()
        return rows * cols * m, cand
    kept = keep.sum(1).double()
    return rows * cols * cols, (kept * (cols - kept)).sum().item()


def bench_steps(shapes, patterns, device, peak_tflops, backends, gen):
    from fastprune.triton_kernels.swap_search import triton_swap_apply, triton_swap_search

    from fastprune.cuda_ops import cuda_swap_search

    searches = {
        "triton": triton_swap_search,
        "cuda": cuda_swap_search,  # hand-written kernel (csrc/), built on first use
        "torch_ref": torch_swap_search,
        "torch_fast": torch_swap_search_fast,
    }
    applies = {
        "triton": triton_swap_apply,
        "cuda": triton_swap_apply,  # the CUDA backend reuses Triton's apply
        "torch_ref": torch_swap_apply,
        "torch_fast": torch_swap_apply,
    }
    out = []
    for rows, cols in shapes:
        W, H = _layer(rows, cols, device, gen)
        for pat in patterns:
            n, m = (0, 0) if pat == "50%" else map(int, pat.split(":"))
            keep = fp.wanda_layer(W, H, sparsity=0.5, prune_n=n, prune_m=m).mask
            c = (W * ~keep) @ H
            evaluated, cand = _work(keep, n, m)
            u_ref, p_ref, d_ref = torch_swap_search(W, keep, c, H, n, m)
            sel = torch.nonzero(d_ref < 0)[:, 0]
            times = {}
            for be in backends:
                search, apply = searches[be], applies[be]
                u, p, d = search(W, keep, c, H, n, m)
                ok = torch.allclose(
                    d, d_ref, rtol=1e-4, atol=1e-6 * d_ref[d_ref.isfinite()].abs().max().item()
                )
                t_search = bench(lambda s=search: s(W, keep, c, H, n, m), device)
                k2, c2 = keep.clone(), c.clone()
                su, sp = u_ref[sel], p_ref[sel]
                t_apply = bench(lambda a=apply: a(W, k2, c2, H, sel, su, sp), device)
                step = t_search + t_apply
                times[be] = step
                tflops = FLOPS_PER_PAIR * evaluated / (t_search * 1e-3) / 1e12
                gbytes = rows * cols * (2 * W.element_size() + 1) / (t_search * 1e-3) / 1e9
                out.append(
                    row(
                        "swap_step",
                        be,
                        (rows, cols),
                        W.dtype,
                        device,
                        step,
                        pattern=pat,
                        search_ms=round(t_search, 4),
                        apply_ms=round(t_apply, 4),
                        swaps=int(sel.numel()),
                        evaluated_pairs_per_s=f"{evaluated / (t_search * 1e-3):.4g}",
                        candidate_pairs_per_s=f"{cand / (t_search * 1e-3):.4g}",
                        tflops=_sig(tflops),
                        # N:M is memory bound: its FLOP/s against the FMA peak means nothing
                        pct_fp32_peak=None if n else _sig(100 * tflops / peak_tflops),
                        search_gbps=_sig(gbytes),
                        matches_ref=bool(ok),
                    )
                )
            torch_times = [v for k, v in times.items() if k.startswith("torch")]
            for fast in ("triton", "cuda"):
                if fast in times and torch_times:
                    out[-len(backends) + backends.index(fast)]["speedup_vs_best_torch"] = round(
                        min(torch_times) / times[fast], 2
                    )
    return out


def sweep(shape, device, peak_tflops, gen):
    """Unstructured search time over a few tile configurations (GPU tuning aid)."""
    from fastprune.triton_kernels.swap_search import triton_swap_search

    rows, cols = shape
    W, H = _layer(rows, cols, device, gen)
    keep = fp.wanda_layer(W, H, sparsity=0.5).mask
    c = (W * ~keep) @ H
    out = []
    for br, bu, bp, nw in [
        (16, 32, 32, 8),  # the default
        (8, 64, 16, 4),
        (16, 32, 16, 4),
        (8, 32, 32, 4),
        (8, 64, 32, 8),
        (16, 16, 32, 4),
        (8, 32, 32, 8),
        (4, 32, 64, 4),
    ]:
        try:
            t = bench(
                lambda br=br, bu=bu, bp=bp, nw=nw: triton_swap_search(
                    W, keep, c, H, block_r=br, block_u=bu, block_p=bp, num_warps=nw
                ),
                device,
            )
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
            print(f"config {(br, bu, bp, nw)} failed: {type(e).__name__}: {e}")
            continue
        tflops = FLOPS_PER_PAIR * rows * cols * cols / (t * 1e-3) / 1e12
        out.append(
            row(
                "swap_search_sweep",
                "triton",
                shape,
                W.dtype,
                device,
                t,
                block_r=br,
                block_u=bu,
                block_p=bp,
                num_warps=nw,
                tflops=_sig(tflops),
                pct_fp32_peak=_sig(100 * tflops / peak_tflops),
            )
        )
    return out


def quality(shapes, device, gen, patterns=("50%", "2:4")):
    """Per-layer error `r^T H r` of SparseSwaps refined from Wanda's mask, vs Wanda's, on
    synthetic layers: `independent` (outlier-scaled i.i.d. activation channels, H close to
    diagonal, where Wanda is already near optimal) and `low_rank` (activations of rank
    cols/4, strongly correlated channels as in real LLM layers)."""
    out = []
    for rows, cols in shapes:
        for kind in ("independent", "low_rank"):
            W, H, _ = random_layer(
                rows,
                cols,
                nsamples=8,
                tokens=128,
                generator=gen,
                ill_conditioned=kind == "low_rank",
            )
            W, H = W.to(device), H.to(device)
            for pat in patterns:
                n, m = (0, 0) if pat == "50%" else map(int, pat.split(":"))
                t = time.perf_counter()
                r = fp.sparseswaps_layer(W, H, sparsity=0.5, prune_n=n, prune_m=m)
                ms = (time.perf_counter() - t) * 1e3
                before, after = r.info["loss_before"], r.info["loss_after"]
                out.append(
                    row(
                        "sparseswaps_quality",
                        r.info["backend"],
                        (rows, cols),
                        W.dtype,
                        device,
                        ms,
                        layer=kind,
                        pattern=pat,
                        loss_wanda=f"{before:.6g}",
                        loss_swaps=f"{after:.6g}",
                        error_reduction_pct=round(100 * (1 - after / before), 2),
                        steps=r.info["steps"],
                        swaps=r.info["swaps"],
                    )
                )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CPU smoke run")
    ap.add_argument("--sweep", action="store_true", help="tile configurations (GPU)")
    ap.add_argument("--quality", action="store_true", help="error reduction over Wanda")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.csv")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=67.0,
        help="float32 FMA peak in TFLOP/s (default: H100 SXM)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--backends",
        default=None,
        help="comma list of triton,cuda,torch_ref,torch_fast (default: all that run here)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    default = (
        "triton,cuda,torch_ref,torch_fast"
        if args.device.startswith("cuda")
        else ("triton,torch_ref,torch_fast")
    )
    backends = (args.backends or default).split(",")
    rows = []
    if args.quality:
        if args.quick:
            shapes = [(64, 128)]
        elif args.device.startswith("cuda"):
            shapes = [(1024, 1024), (4096, 4096)]
        else:  # the torch reference on CPU: keep it to minutes
            shapes = [(128, 256), (256, 512)]
        rows += quality(shapes, args.device, gen)
    elif args.sweep:
        rows += sweep(
            (4096, 4096) if not args.quick else (64, 256), args.device, args.peak_tflops, gen
        )
    else:
        if args.quick:
            shapes = [(64, 256), (37, 192)]
        else:
            shapes = [(4096, 4096), (11008, 4096)]
        rows += bench_steps(shapes, ["50%", "2:4"], args.device, args.peak_tflops, backends, gen)
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
