"""SparseSwaps: every backend's `swap_search` and `swap_apply`, and whole steps, against the
chunked PyTorch versions.

A step = `swap_search` over all rows + `swap_apply` for the rows whose best swap lowers the
loss (the first step of a run, every row active, is the most expensive one), warm-started
from Wanda's mask. Rows per shape and pattern:
  * `swap_search` on each backend with its own (`fastprune.ops.get_op`), and `torch_fast`:
    pairs/s, TFLOP/s from counted pair work against a float32 FMA peak (`--peak-tflops`,
    default H100 SXM 67), GB/s of reading w, c and keep, and whether it matches the torch
    reference's Δ;
  * `swap_apply` on each backend with its own, for that step's swaps;
  * `swap_step` (search + selection + apply) through the dispatcher (`fastprune.ops.Kernels`,
    the implementations a solve runs: the CUDA backend takes Triton's swap_apply), labelled
    by the swap_search that ran; `speedup_vs_best_torch` against the faster of `torch` and
    `torch_fast` (target: >= 10x).

Counted work: the search evaluates every (u, p) pair of a row densely (masks differ per row,
so a tile of H can only be shared by rows if it is dense): `evaluated = rows * cols^2`
(N:M: `rows * cols * m`), of which `candidates = sum_rows kept * pruned` (N:M: per group)
are legal. FLOPs = 4 per evaluated pair (Δ = a_u + b_p + x_u * H_up * y_p: two multiplies,
two adds; per-row terms are O(cols) and the min compare is not counted). The N:M search is
memory bound (cols*m pairs per row), so its FLOP/s are not compared with the peak.

`torch` is the reference `torch_swap_search` (chunked over rows and u on a GPU, per row on
the CPU); `torch_fast` is a chunked variant written for this benchmark: the per-row terms are
folded as in the kernel and the `[R, cols, cols]` chunk is built with one broadcast multiply
plus two in-place passes (mul_, add_) and reduced over p then u; same (u, p, Δ).

    python -m benchmarks.bench_swap_search                   # GPU: 4096x4096, 11008x4096
    python -m benchmarks.bench_swap_search --quick           # small CPU smoke run
    python -m benchmarks.bench_swap_search --sweep           # GPU: Triton tile configurations
    python -m benchmarks.bench_swap_search --quality         # error reduction over Wanda
    python -m benchmarks.bench_swap_search --out benchmarks/results/swap_search_h100
"""

from __future__ import annotations

import time

import torch

import fastprune as fp
from benchmarks.harness import (
    arg_parser,
    bench,
    bench_as,
    is_cuda,
    kernels_label,
    layer,
    note,
    parse,
    pattern,
    row,
    sig,
    time_op,
    write_rows,
)
from fastprune.ops import Kernels, torch_swap_apply, torch_swap_search
from fastprune.ops.swap_search import _swap_terms
from fastprune.solvers.sparseswaps import SWAP_OPS
from fastprune.timing import Timing

FULL_SHAPES = [(4096, 4096), (11008, 4096)]
QUICK_SHAPES = [(64, 256), (37, 192)]
FLOPS_PER_PAIR = 4
TORCH_VERSIONS = ("torch", "torch_fast")
# Triton tile configurations tried by --sweep: (block_r, block_u, block_p, num_warps)
SWEEP_CONFIGS = [
    (16, 32, 32, 8),  # the default
    (8, 64, 16, 4),
    (16, 32, 16, 4),
    (8, 32, 32, 4),
    (8, 64, 32, 8),
    (16, 16, 32, 4),
    (8, 32, 32, 8),
    (4, 32, 64, 4),
]


def parser():
    p = arg_parser(__doc__, FULL_SHAPES, QUICK_SHAPES)
    p.add_argument("--sweep", action="store_true", help="Triton tile configurations (GPU)")
    p.add_argument("--quality", action="store_true", help="error reduction over Wanda")
    p.add_argument(
        "--peak-tflops", type=float, default=67.0, help="float32 FMA peak (default H100 SXM)"
    )
    return p


def torch_swap_search_fast(w, keep, c, H, prune_n=0, prune_m=0, budget=1 << 25):
    """Chunked PyTorch swap search with fewer passes than the reference (same contract)."""
    if prune_n:  # the reference N:M search is already one vectorised pass per row chunk
        return torch_swap_search(w, keep, c, H, prune_n, prune_m)
    rows, cols = w.shape
    a, b = _swap_terms(w, keep, c, H.diagonal())
    x = torch.where(keep, -2 * w, 0.0)
    y = torch.where(keep, 0.0, w)
    tile_r = max(1, budget // (cols * cols))
    found = []  # (delta, u, p) per chunk of rows
    for r0 in range(0, rows, tile_r):
        r1 = min(rows, r0 + tile_r)
        T = H[None] * y[r0:r1, None, :]  # [R, U, P]
        T.mul_(x[r0:r1, :, None]).add_(b[r0:r1, None, :])
        v, pidx = T.min(dim=2)  # [R, U]
        del T
        v += a[r0:r1]
        val, uidx = v.min(dim=1)
        found.append((val, uidx, pidx.gather(1, uidx[:, None])[:, 0]))
    d, u, p = (torch.cat(t) for t in zip(*found, strict=True))
    return u, p, d


def problem(rows: int, cols: int, device, seed: int, n: int, m: int):
    """`(W, H, keep, c)`: a random layer, its Wanda warm start and `c = (W * ~keep) @ H`."""
    W, H = layer(rows, cols, device, seed, tokens=512)
    keep = fp.wanda_layer(W, H, sparsity=0.5, prune_n=n, prune_m=m).mask
    return W, H, keep, (W * ~keep) @ H


def _work(keep, n, m):
    """(evaluated pairs, candidate pairs) of one search over every row."""
    rows, cols = keep.shape
    if n:
        kept = keep.reshape(rows, -1, m).sum(-1).double()
        return rows * cols * m, (kept * (m - kept)).sum().item()
    kept = keep.sum(1).double()
    return rows * cols * cols, (kept * (cols - kept)).sum().item()


def _matches(d, ref) -> bool:
    scale = ref[ref.isfinite()].abs().max().item() if ref.isfinite().any() else 0.0
    return bool(torch.allclose(d, ref, rtol=1e-4, atol=1e-6 * scale))


def _speedups(rows: list[dict]) -> None:
    """`speedup_vs_best_torch` of every non-torch row against the faster torch version."""
    torch_ms = [r["median_ms"] for r in rows if r["backend"] in TORCH_VERSIONS]
    for r in rows:
        if torch_ms and r["backend"] not in TORCH_VERSIONS:
            r["speedup_vs_best_torch"] = round(min(torch_ms) / r["median_ms"], 2)


def step_rows(shape, pname, device, backends, peak_tflops, seed) -> list[dict]:
    """The swap_search, swap_apply and swap_step rows of one shape and pattern."""
    n, m = pattern(pname)
    W, H, keep, c = problem(*shape, device, seed, n, m)
    evaluated, cand = _work(keep, n, m)
    ref = torch_swap_search(W, keep, c, H, n, m)
    sel = torch.nonzero(ref.delta < 0)[:, 0]
    common = {"pattern": pname}
    searches: list[tuple[str, Timing, tuple]] = list(
        time_op("swap_search", device, backends, (W, keep, c, H, n, m), pname)
    )
    if "torch" in backends:
        fast = lambda: torch_swap_search_fast(W, keep, c, H, n, m)  # noqa: E731
        searches.append(("torch_fast", bench(fast, device), fast()))
    search_rows = []
    for be, t, (_, _, d) in searches:
        s = t.p50_ms * 1e-3
        tflops = FLOPS_PER_PAIR * evaluated / s / 1e12
        search_rows.append(
            row(
                "swap_search",
                be,
                shape,
                W.dtype,
                device,
                t,
                **common,
                evaluated_pairs_per_s=f"{evaluated / s:.4g}",
                candidate_pairs_per_s=f"{cand / s:.4g}",
                tflops=sig(tflops),
                pct_fp32_peak=None if n else sig(100 * tflops / peak_tflops),
                search_gbps=sig(W.shape[0] * W.shape[1] * (2 * W.element_size() + 1) / s / 1e9),
                matches_ref=_matches(d, ref.delta),
            )
        )
    _speedups(search_rows)
    k2, c2 = keep.clone(), c.clone()  # swap_apply and steps write here, again and again
    apply_args = (W, k2, c2, H, sel, ref.u[sel], ref.p[sel])
    apply_rows = [
        row("swap_apply", be, shape, W.dtype, device, t, **common, swaps=int(sel.numel()))
        for be, t, _ in time_op("swap_apply", device, backends, apply_args, pname)
    ]
    steps = []
    for be in [*backends, "torch_fast"] if "torch" in backends else backends:
        if be == "torch_fast":
            search, apply, kernels = torch_swap_search_fast, torch_swap_apply, None
        else:
            kernels = Kernels(be, torch.device(device), SWAP_OPS)
            search, apply = kernels.op("swap_search"), kernels.op("swap_apply")

        def step(search=search, apply=apply):
            u, p, d = search(W, keep, c, H, n, m)
            s = torch.nonzero(d < 0)[:, 0]
            apply(W, k2, c2, H, s, u[s], p[s])

        step()
        info = (
            kernels.info() if kernels else {"kernels": {"swap_search": be, "swap_apply": "torch"}}
        )
        ran = info["kernels"]["swap_search"]
        if ran in [r["backend"] for r in steps]:
            note(f"swap_step backend={be} ran {ran}'s swap_search, already measured")
            continue
        t = bench_as(ran, step, device)
        steps.append(
            row(
                "swap_step",
                ran,
                shape,
                W.dtype,
                device,
                t,
                **common,
                kernels=kernels_label(info),
                swaps=int(sel.numel()),
            )
        )
    _speedups(steps)
    return search_rows + apply_rows + steps


def sweep_rows(shape, device, peak_tflops, seed) -> list[dict]:
    """Unstructured Triton search time over `SWEEP_CONFIGS` (a GPU tuning aid)."""
    from fastprune.triton_kernels.swap_search import triton_swap_search

    rows, cols = shape
    W, H, keep, c = problem(rows, cols, device, seed, 0, 0)
    out = []
    for br, bu, bp, nw in SWEEP_CONFIGS:
        tiles = {"block_r": br, "block_u": bu, "block_p": bp, "num_warps": nw}
        fn = lambda tiles=tiles: triton_swap_search(W, keep, c, H, **tiles)  # noqa: E731
        try:
            t = bench(fn, device)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is reported
            note(f"config {tiles} failed: {type(e).__name__}: {e}")
            continue
        tflops = FLOPS_PER_PAIR * rows * cols * cols / (t.p50_ms * 1e-3) / 1e12
        out.append(
            row(
                "swap_search_sweep",
                "triton",
                shape,
                W.dtype,
                device,
                t,
                **tiles,
                tflops=sig(tflops),
                pct_fp32_peak=sig(100 * tflops / peak_tflops),
            )
        )
    return out


def quality_rows(shapes, device, patterns, seed) -> list[dict]:
    """Per-layer error `r^T H r` of SparseSwaps refined from Wanda's mask, vs Wanda's, on
    synthetic layers: `independent` (outlier-scaled i.i.d. activation channels, H close to
    diagonal, where Wanda is already near optimal) and `low_rank` (activations of rank
    cols/4, strongly correlated channels as in real LLM layers). One timed run each."""
    out = []
    for shape in shapes:
        for kind in ("independent", "low_rank"):
            W, H = layer(*shape, device, seed, tokens=1024, ill_conditioned=kind == "low_rank")
            for pname in patterns:
                n, m = pattern(pname)
                t = time.perf_counter()
                r = fp.sparseswaps_layer(W, H, sparsity=0.5, prune_n=n, prune_m=m)
                ms = (time.perf_counter() - t) * 1e3
                before, after = r.info["loss_before"], r.info["loss_after"]
                out.append(
                    row(
                        "sparseswaps_quality",
                        r.info["kernels"].get("swap_search", r.info["backend"]),
                        shape,
                        W.dtype,
                        device,
                        Timing.once(ms),
                        layer=kind,
                        pattern=pname,
                        loss_wanda=f"{before:.6g}",
                        loss_swaps=f"{after:.6g}",
                        error_reduction_pct=round(100 * (1 - after / before), 2),
                        steps=r.info["steps"],
                        swaps=r.info["swaps"],
                    )
                )
    return out


def main(argv=None) -> None:
    args = parse(parser(), argv)
    shapes_given = args.shapes_given
    if args.quality:
        if shapes_given or args.quick:
            shapes = args.shapes if shapes_given else [(64, 128)]
        elif is_cuda(args.device):
            shapes = [(1024, 1024), (4096, 4096)]
        else:  # the torch reference on CPU: keep it to minutes
            shapes = [(128, 256), (256, 512)]
        rows = quality_rows(shapes, args.device, args.patterns, args.seed)
    elif args.sweep:
        if "triton" not in args.backends:
            note("--sweep times the Triton kernel: no Triton backend here")
            rows = []
        else:
            shape = args.shapes[0] if shapes_given else (64, 256) if args.quick else (4096, 4096)
            rows = sweep_rows(shape, args.device, args.peak_tflops, args.seed)
    else:
        rows = []
        for shape in args.shapes:
            for pname in args.patterns:
                rows += step_rows(
                    shape, pname, args.device, args.backends, args.peak_tflops, args.seed
                )
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
