"""SparseGPT/ROSE family: reference column loop vs fastprune's torch and Triton backends, the
unavoidable-work floor, and ROSE's column losses.

Rows (one per kernel x backend x shape x pattern), all measured in the same run:
  * `sparsegpt_reference_loop`: `fastprune.original.original_sparsegpt` (the IST-DASLab loop);
  * `sparsegpt_layer` / `rose_layer` with backend torch and triton (Triton on CUDA tensors,
    or through the interpreter on CPU for the tiny `--quick` shape only);
  * `floor`: Cholesky + cholesky_inverse + upper Cholesky + one rows x cols x cols GEMM, the
    work any exact SparseGPT must do (DESIGN §5 "within 2x of the floor");
  * `column_losses`: the reference's per-block sorts (`original._rose_block_losses`), the
    torch op (kthvalue) and the Triton op, plus `read_scores` (one read of the scores, the
    memory-bandwidth floor).
Each row carries `speedup_vs_reference` / `x_floor` where that comparison applies.

    python benchmarks/bench_obs.py                       # LLaMA-7B shapes on the GPU
    python benchmarks/bench_obs.py --quick               # small CPU smoke run (< 1 min)
    python benchmarks/bench_obs.py --out benchmarks/results/obs_h100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

FULL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(256, 512)]
QUICK_TRITON_SHAPE = (32, 128)  # the interpreter is slow: only a tiny layer on CPU
PATTERNS = {"unstructured": (0, 0), "2:4": (2, 4)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, CPU smoke run")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.csv")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--no-cuda", action="store_true", help="skip the hand-written CUDA backend")
    p.add_argument(
        "--skip-reference", action="store_true", help="skip the slow reference column loop"
    )
    return p.parse_args(argv)


def make_layer(rows: int, cols: int, device: str, tokens: int = 2048, seed: int = 0):
    """Random LLM-like layer built on the device: W [rows, cols], H = 2/n X^T X (float32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    scale = torch.rand(cols, generator=g, device=device) + 0.1
    scale[torch.randperm(cols, generator=g, device=device)[: max(1, cols // 64)]] *= 20
    H = torch.zeros(cols, cols, device=device)
    for t0 in range(0, tokens, 512):
        X = torch.randn(min(512, tokens - t0), cols, generator=g, device=device) * scale
        H.addmm_(X.t(), X, alpha=2 / tokens)
    W = torch.randn(rows, cols, generator=g, device=device) * 0.05
    return W, H


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_slow(fn, device: str, rep: int = 2) -> float:
    """Median ms of a slow function (seconds per call): one warm-up, `rep` timed calls."""
    fn()
    sync(device)
    times = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def floor_fn(W: torch.Tensor, H: torch.Tensor):
    def run():
        cols = H.shape[0]
        Hd = H.clone()
        Hd.diagonal().add_(0.01 * Hd.diagonal().mean())
        L = torch.linalg.cholesky(Hd)
        Hi = torch.cholesky_inverse(L)
        U = torch.linalg.cholesky(Hi, upper=True)
        return W @ U[:cols, :cols]

    return run


def bench_layer_family(rows, cols, device, args, triton_ok, out):
    from harness import bench, row

    import fastprune as fp
    from fastprune.original import original_sparsegpt

    W, H = make_layer(rows, cols, device)
    shape = (rows, cols)
    bs = args.blocksize
    floor_ms = bench(floor_fn(W, H), device)
    out.append(
        row("floor", "torch", shape, W.dtype, device, floor_ms, note="chol+inverse+upper chol+GEMM")
    )
    for pname, (n, m) in PATTERNS.items():
        ref_ms = None
        if not args.skip_reference:
            ref_ms = time_slow(lambda n=n, m=m: original_sparsegpt(W, H, 0.5, n, m, bs), device)
            out.append(
                row(
                    "sparsegpt_reference_loop",
                    "torch",
                    shape,
                    W.dtype,
                    device,
                    ref_ms,
                    pattern=pname,
                    x_floor=round(ref_ms / floor_ms, 2),
                )
            )
        backends = ["torch"] + (["triton"] if triton_ok else [])
        if device.startswith("cuda") and not args.no_cuda:
            backends.append("cuda")  # hand-written kernels (csrc/), built on first use
        for solver in (fp.sparsegpt_layer, fp.rose_layer):
            for be in backends:
                fn = lambda s=solver, b=be, n=n, m=m: s(W, H, 0.5, n, m, bs, backend=b)  # noqa: E731
                try:
                    fn()  # warm-up; builds the CUDA extension on first use
                except Exception as e:  # noqa: BLE001 - report and keep benchmarking
                    print(f"skipping {solver.__name__} backend={be}: {e}")
                    continue
                if device.startswith("cuda"):
                    ms = bench(fn, device)
                else:  # the interpreter is slow: one timed call
                    ms = time_slow(fn, device, 1 if be == "triton" else 3)
                extra = {"pattern": pname, "x_floor": round(ms / floor_ms, 2)}
                if ref_ms:
                    extra["speedup_vs_reference"] = round(ref_ms / ms, 2)
                out.append(row(solver.__name__, be, shape, W.dtype, device, ms, **extra))


def bench_column_losses(rows, cols, device, args, triton_ok, out):
    from fastprune.ops.torch_ref import torch_column_losses
    from harness import bench, row

    from fastprune.obs import block_bounds
    from fastprune.original import _rose_block_losses

    W, H = make_layer(rows, cols, device, tokens=256)
    S = W.abs() * torch.sqrt(torch.diagonal(H) / 2).reshape(1, -1)
    shape = (rows, cols)
    bs = args.blocksize
    bounds = block_bounds(cols, bs)
    nbytes = S.numel() * S.element_size()
    read_ms = bench(lambda: S.sum(), device)
    out.append(
        row(
            "read_scores",
            "torch",
            shape,
            S.dtype,
            device,
            read_ms,
            gbps=round(nbytes / read_ms / 1e6, 1),
        )
    )
    ref_ms = bench(lambda: _rose_block_losses(S, cols, bs, 0.5), device)
    out.append(
        row(
            "column_losses_reference_sorts",
            "torch",
            shape,
            S.dtype,
            device,
            ref_ms,
            x_read=round(ref_ms / read_ms, 2),
        )
    )
    impls = [("torch", torch_column_losses)]
    if triton_ok:
        from fastprune.triton_kernels.column_losses import triton_column_losses

        impls.append(("triton", triton_column_losses))
    for be, fn in impls:
        ms = bench(lambda fn=fn: fn(S, bounds, 0.5), device)
        out.append(
            row(
                "column_losses",
                be,
                shape,
                S.dtype,
                device,
                ms,
                speedup_vs_reference=round(ref_ms / ms, 2),
                x_read=round(ms / read_ms, 2),
            )
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        # must precede the first import of the Triton kernels
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import write_rows

    try:
        from fastprune.triton_kernels import OPS

        have_triton = all(k in OPS for k in ("obs_sweep", "block_prune_mask", "column_losses"))
    except ImportError:
        have_triton = False
    if not args.quick and not device.startswith("cuda"):
        print("note: full shapes on CPU take long; the triton rows need CUDA (use --quick)")

    out: list[dict] = []
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    on_gpu = device.startswith("cuda")
    for rows, cols in shapes:
        bench_layer_family(rows, cols, device, args, have_triton and on_gpu, out)
        bench_column_losses(rows, cols, device, args, have_triton and on_gpu, out)
    if args.quick and not on_gpu and have_triton:
        # interpreter smoke rows: correctness of the path, not speed
        saved, args.blocksize = args.blocksize, 32
        bench_layer_family(*QUICK_TRITON_SHAPE, device, args, True, out)
        bench_column_losses(*QUICK_TRITON_SHAPE, device, args, True, out)
        args.blocksize = saved
        for r in out:
            if r["backend"] == "triton" and not on_gpu:
                r["note"] = "TRITON_INTERPRET=1 (interpreter, not a speed figure)"
    write_rows(out, args.out)


if __name__ == "__main__":
    main()
