"""obs_sweep + trailing update: whole SparseGPT/ROSE layer solves on every backend against the
original column loop and the unavoidable work, and the obs_sweep op alone.

Rows (per shape and pattern, all measured in the same run):
  * `floor` (torch): the inverse (`fastprune.inverse_hessian`, direct: one Cholesky of the
    flipped damped H and a triangular inverse) + the block loop's trailing GEMMs
    `W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]`, the work any exact SparseGPT does
    (target: a solve within 1.5x of it);
  * `sparsegpt_layer` / `rose_layer`: backend `original` (`fastprune.original`'s
    IST-DASLab / ROSE loops, one small op per column), then each fastprune backend as the
    solver's `backend=`, labelled by the obs_sweep implementation that ran (all of
    `r.info["kernels"]` in `kernels`); `speedup_vs_original`, `x_floor`;
  * `obs_sweep`: the op alone on the first block (rows x blocksize) for each backend that
    has its own (`fastprune.ops.get_op`), with GFLOP/s of its rank-1 updates; and with its
    `quant` option (column `quant`): int4 symmetric with groups of min(128, blocksize) whose
    grids the sweep finds (GPTQ's w4a16), and fp8 per channel, on the backends that declare
    it (`fastprune.ops.backend_quant`).

    python -m benchmarks.bench_obs_sweep                     # LLaMA-7B shapes on the GPU
    python -m benchmarks.bench_obs_sweep --quick             # small CPU smoke run
    python -m benchmarks.bench_obs_sweep --out benchmarks/results/obs_sweep_h100
"""

from __future__ import annotations

import torch

import fastprune as fp
from benchmarks.harness import (
    arg_parser,
    bench,
    bench_as,
    implementations,
    kernels_label,
    note,
    pattern,
    ratio,
    row,
    run_layers,
    sig,
    time_op,
)
from fastprune.ops import QuantBlock, torch_block_prune_mask
from fastprune.ops.dispatch import backend_quant
from fastprune.original import original_rose, original_sparsegpt
from fastprune.quant import has_fp8
from fastprune.solvers.obs import block_bounds

FULL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(256, 512)]
SOLVERS = {"sparsegpt_layer": fp.sparsegpt_layer, "rose_layer": fp.rose_layer}


def parser():
    p = arg_parser(__doc__, FULL_SHAPES, QUICK_SHAPES)
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--skip-original", action="store_true", help="skip the slow original loops")
    return p


def floor_fn(W: torch.Tensor, H: torch.Tensor, blocksize: int):
    """The unavoidable work of a solve: the inverse and the trailing GEMMs (Err1 stood in for
    by the block's weights: the values do not change the time)."""
    bounds = block_bounds(W.shape[1], blocksize)

    def run():
        hinv = fp.inverse_hessian(H, 0.01).hinv
        Wc = W.clone()
        for i1, i2 in bounds[:-1]:
            Wc[:, i2:].addmm_(W[:, i1:i2], hinv[i1:i2, i2:], alpha=-1)
        return Wc

    return run


def original_fn(solver: str, W, H, n: int, m: int, blocksize: int):
    if solver == "sparsegpt_layer":
        return lambda: original_sparsegpt(W, H, 0.5, n, m, blocksize)
    scaler = torch.diagonal(H) / 2
    return lambda: original_rose(W, H, scaler, 0.5, n, m, blocksize)


def solve_rows(
    W, H, device, backends, patterns, blocksize, *, original=True, floor=None, warmup=1, rep=2
):
    """Rows of `sparsegpt_layer` / `rose_layer` on each backend and the original loops
    (`warmup` + `rep` calls of the slow original; `rep` timed calls of each backend)."""
    out = []
    shape = tuple(W.shape)
    for pname in patterns:
        n, m = pattern(pname)
        for sname, solver in SOLVERS.items():
            common = {"pattern": pname, "blocksize": blocksize}
            orig = None
            if original:
                fn = original_fn(sname, W, H, n, m, blocksize)
                try:
                    orig = bench(fn, device, warmup=warmup, rep=rep)
                except NotImplementedError as e:  # where the original code crashes
                    note(f"no original {sname} {pname} row: {e}")
                if orig is not None:
                    x = ratio(orig, floor) if floor else None
                    out.append(
                        row(sname, "original", shape, W.dtype, device, orig, **common, x_floor=x)
                    )
            seen = set()
            for be in backends:
                fn = lambda s=solver, b=be: s(W, H, 0.5, n, m, blocksize=blocksize, backend=b)  # noqa: E731
                try:
                    r = fn()  # warm-up; builds the CUDA extension on first use
                except Exception as e:  # noqa: BLE001 - report and keep benchmarking
                    note(f"skipping {sname} backend={be}: {type(e).__name__}: {e}")
                    continue
                ran = r.info["kernels"].get("obs_sweep", be)
                if ran in seen:
                    note(f"{sname} backend={be} ran {ran}'s obs_sweep, already measured")
                    continue
                seen.add(ran)
                fallback = r.info.get("kernel_fallbacks")
                t = bench_as(ran, fn, device, rep=rep)
                out.append(
                    row(
                        sname,
                        ran,
                        shape,
                        W.dtype,
                        device,
                        t,
                        **common,
                        kernels=kernels_label(r.info),
                        asked=be if ran != be else None,
                        fallbacks=str(fallback) if fallback else None,
                        speedup_vs_original=ratio(orig, t) if orig else None,
                        x_floor=ratio(t, floor) if floor else None,
                    )
                )
    return out


def first_block(W, H, blocksize):
    """The first block's `W1`, `Hinv1` (the damped inverse's) and the sweep's counted work:
    one multiply-add per (row, i < j) pair."""
    hinv = fp.inverse_hessian(H, 0.01).hinv
    count = min(blocksize, W.shape[1])
    W1, Hinv1 = W[:, :count], hinv[:count, :count].contiguous()
    return W1, Hinv1, W1.shape[0] * count * (count - 1)


def sweep_args(W1, Hinv1, pname: str) -> tuple:
    """obs_sweep's arguments for pattern `pname` (unstructured: the first block's mask)."""
    n, m = pattern(pname)
    keep1 = None if n else torch_block_prune_mask(W1, Hinv1.diagonal(), 0.5)
    return (W1, Hinv1, keep1, n, m)


def sweep_row(be, W1, device, t, flops, base, **extra) -> dict:
    """One obs_sweep row: GFLOP/s from the counted work, the speedup over torch's `base`."""
    return row(
        "obs_sweep",
        be,
        tuple(W1.shape),
        W1.dtype,
        device,
        t,
        **extra,
        gflops=sig(flops / (t.p50_ms * 1e-3) / 1e9),
        speedup_vs_torch=ratio(base, t) if base and be != "torch" else None,
    )


def sweep_rows(W, H, device, backends, patterns, blocksize):
    """Rows of the obs_sweep op alone on the first block, per backend with its own kernel."""
    out = []
    W1, Hinv1, flops = first_block(W, H, blocksize)
    for pname in patterns:
        args = sweep_args(W1, Hinv1, pname)
        base = None
        for be, t, _ in time_op("obs_sweep", device, backends, args, pname):
            base = base or (t if be == "torch" else None)
            out.append(sweep_row(be, W1, device, t, flops, base, pattern=pname))
    return out


def quant_blocks(W1: torch.Tensor) -> dict[str, QuantBlock]:
    """The quantized sweeps timed: int4 sym in groups whose grids the sweep finds (the given
    grids are placeholders it overwrites) and fp8 per channel (a static grid from W1)."""
    rows, count = W1.shape
    gs = min(128, count)
    G = -(-count // gs)
    ones = torch.ones(rows, G, device=W1.device)
    int4 = QuantBlock(15, True, False, gs, ones, ones * 8, True)
    amax = W1.abs().amax(1, keepdim=True).float()
    fp8_scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    fp8 = QuantBlock(255, True, True, count, fp8_scale, torch.zeros_like(fp8_scale), False)
    return {f"int4 g{gs} sweep": int4, **({"fp8 channel": fp8} if has_fp8() else {})}


def quant_rows(W, H, device, backends, patterns, blocksize):
    """Rows of the obs_sweep op with its quant option on the first block, per backend that
    has its own kernel and declares the option."""
    out = []
    W1, Hinv1, flops = first_block(W, H, blocksize)
    impls = implementations("obs_sweep", device, backends)
    for qname, qb in quant_blocks(W1).items():
        for pname in patterns:
            args = sweep_args(W1, Hinv1, pname)
            base = None
            for be, fn, unsupported in impls:
                if be != "torch" and "obs_sweep" not in backend_quant(be):
                    note(f"skipping obs_sweep {qname} on {be}: no quant option")
                    continue
                why = unsupported(*args, quant=qb)
                if why:
                    note(f"skipping obs_sweep {qname} {pname} on {be}: {why}")
                    continue
                fn(*args, quant=qb)  # warm-up (builds or compiles the kernel)
                t = bench_as(be, lambda fn=fn: fn(*args, quant=qb), device)
                base = base or (t if be == "torch" else None)
                out.append(sweep_row(be, W1, device, t, flops, base, pattern=pname, quant=qname))
    return out


def main(argv=None) -> None:
    def rows_of(W, H, a):
        floor = bench(floor_fn(W, H, a.blocksize), a.device)
        what = "inverse_hessian + trailing GEMMs"
        out = [row("floor", "torch", W.shape, W.dtype, a.device, floor, note=what)]
        out += solve_rows(
            W,
            H,
            a.device,
            a.backends,
            a.patterns,
            a.blocksize,
            original=not a.skip_original,
            floor=floor,
        )
        out += sweep_rows(W, H, a.device, a.backends, a.patterns, a.blocksize)
        return out + quant_rows(W, H, a.device, a.backends, a.patterns, a.blocksize)

    run_layers(parser(), argv, rows_of)


if __name__ == "__main__":
    main()
