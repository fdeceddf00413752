"""Shared benchmark harness: the one timer (`fastprune.timing`), the one synthetic layer
(`fastprune.testing.random_layer`), the common command line, which backends can run an op
here, and JSON/CSV rows.

Every row: kernel, backend (the implementation that ran), shape, dtype, device, torch,
triton, cuda (versions), p20_ms, median_ms, p80_ms, reps, timer, plus work columns (tflops,
gbps, ... from counted work) and comparisons (speedup_vs_original, x_floor, ...).

Run a benchmark as a module from the repository root: `python -m benchmarks.bench_<op>`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from fastprune.ops import OPS, BackendUnavailableError, backend_ops, get_op, resolve_backend
from fastprune.testing import random_layer
from fastprune.timing import Timing, measure

BACKENDS = ("torch", "triton", "cuda")
GPU_BUDGET_MS = 100.0
"""Timed milliseconds per measurement on a GPU (do_bench's default)."""
CPU_BUDGET_MS = 50.0
"""... and on the CPU (calls of a second or more: just `rep` of them)."""


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def bench(fn, device, warmup: int = 1, rep: int = 3, budget_ms: float | None = None) -> Timing:
    """`fastprune.timing.measure` with the benchmarks' budget: at least `rep` timed calls,
    more until about `GPU_BUDGET_MS` (`CPU_BUDGET_MS` on the CPU) of them."""
    if budget_ms is None:
        budget_ms = GPU_BUDGET_MS if is_cuda(device) else CPU_BUDGET_MS
    return measure(fn, device, warmup=warmup, rep=rep, budget_ms=budget_ms)


def bench_as(backend: str, fn, device, rep: int = 3) -> Timing:
    """`bench` for one backend's call that has already run once (the warm-up, which also
    checked that it runs): on the CPU no more warm-up; a backend simulated on the CPU is timed
    once (`simulated` says why its rows carry no speed figure)."""
    if simulated(backend, device):
        return bench(fn, device, warmup=0, rep=1, budget_ms=0)
    return bench(fn, device, warmup=1 if is_cuda(device) else 0, rep=rep)


def simulated(backend: str, device) -> str | None:
    """Why `backend`'s rows on `device` are no speed figure (None on a GPU or for torch)."""
    if is_cuda(device) or backend not in ("triton", "cuda"):
        return None
    if backend == "triton":
        return "TRITON_INTERPRET=1 (interpreter, not a speed figure)"
    return "FASTPRUNE_CUDA_EMULATE=1 (emulator, not a speed figure)"


def layer(rows: int, cols: int, device, seed: int = 0, tokens: int = 2048, **kwargs):
    """`(W, H)`: a random LLM-like layer (`random_layer`: outlier activation channels, H from
    `tokens` tokens), drawn on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    per = min(tokens, 512)
    W, H, _ = random_layer(
        rows, cols, nsamples=max(1, tokens // per), tokens=per, generator=g, device=device, **kwargs
    )
    return W, H


def pattern(name: str) -> tuple[int, int]:
    """'unstructured' -> (0, 0); 'N:M' -> (N, M)."""
    if name == "unstructured":
        return 0, 0
    n, m = name.split(":")
    return int(n), int(m)


def shapes_arg(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(x) for x in s.split("x")) for s in text.split(",")]  # type: ignore[misc]
    except ValueError:
        msg = f"shapes are ROWSxCOLS[,ROWSxCOLS...], got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def arg_parser(
    doc: str,
    full_shapes: list[tuple[int, int]],
    quick_shapes: list[tuple[int, int]],
    patterns: tuple[str, ...] | None = ("unstructured", "2:4"),
) -> argparse.ArgumentParser:
    """The options every op benchmark takes (`parse` fills in the defaults)."""
    fmt = ",".join(f"{r}x{c}" for r, c in full_shapes)
    qfmt = ",".join(f"{r}x{c}" for r, c in quick_shapes)
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=shapes_arg, help=f"ROWSxCOLS,... (default {fmt})")
    p.add_argument("--quick", action="store_true", help=f"small shapes ({qfmt}): a smoke run")
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma list of torch,triton,cuda (default: all; one that cannot run here is "
        "skipped with a note: triton on CPU needs TRITON_INTERPRET=1, cuda on CPU "
        "FASTPRUNE_CUDA_EMULATE=1)",
    )
    if patterns:
        p.add_argument("--patterns", default=",".join(patterns), help="unstructured and/or N:M")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.csv")
    p.set_defaults(full_shapes=full_shapes, quick_shapes=quick_shapes)
    return p


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    _NOTED.clear()  # notes are printed once per run
    args.shapes_given = args.shapes is not None
    if args.shapes is None:
        args.shapes = args.quick_shapes if args.quick else args.full_shapes
    args.backends = [b for b in args.backends.split(",") if b]
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        parser.error(f"unknown backend(s) {bad}; choose from {','.join(BACKENDS)}")
    args.backends = runnable(args.device, args.backends)
    if hasattr(args, "patterns"):
        args.patterns = args.patterns.split(",")
    if not is_cuda(args.device) and not args.quick and max(r * c for r, c in args.shapes) > 2**22:
        print("note: large shapes on CPU take long (--quick or --shapes for a smoke run)")
    return args


def run_layers(parser: argparse.ArgumentParser, argv, rows_of, tokens: int = 2048) -> None:
    """A benchmark's main: parse `argv`, build each shape's layer `(W, H)` (`layer`) and write
    the rows `rows_of(W, H, args)` returns for it."""
    args = parse(parser, argv)
    out: list[dict] = []
    for rows, cols in args.shapes:
        W, H = layer(rows, cols, args.device, args.seed, tokens=tokens)
        out += rows_of(W, H, args)
    write_rows(out, args.out)


def _takes_all(*_args, **_kwargs) -> None:
    return None


def runnable(device, backends) -> list[str]:
    """The backends of `backends` that can run here, with a printed note for the others."""
    out = []
    for be in backends:
        try:
            resolve_backend(be, torch.device(device), OPS)
        except BackendUnavailableError as e:
            note(f"skipping backend {be}: {e}")
            continue
        out.append(be)
    return out


_NOTED: set[str] = set()


def note(msg: str) -> None:
    """Print `note: msg`, once per distinct message."""
    if msg not in _NOTED:
        _NOTED.add(msg)
        print(f"note: {msg}")


def implementations(op: str, device, backends) -> list[tuple[str, Callable, Callable]]:
    """`(backend, fn, unsupported)` for each of `backends` that has its own `op` and can run
    on `device` (`fastprune.ops.get_op`); a printed note for each one that cannot."""
    out = []
    for be in backends:
        if be == "torch":
            out.append(("torch", get_op(op, "torch"), _takes_all))
            continue
        try:
            resolve_backend(be, torch.device(device), (op,))
            table = backend_ops(be)
        except BackendUnavailableError as e:
            note(f"skipping {op} on {be}: {e}")
            continue
        if op not in table:
            note(f"skipping {op} on {be}: no kernel of its own (its solves run the next backend's)")
            continue
        out.append((be, get_op(op, be), table[op][1]))
    return out


def time_op(op: str, device, backends, args: tuple, what: str = ""):
    """For each backend with its own `op` that takes `args`: one checked warm-up call, then
    `bench_as`. Yields `(backend, Timing, output of the warm-up call)`."""
    for be, fn, unsupported in implementations(op, device, backends):
        why = unsupported(*args)
        if why:
            note(f"skipping {op} {what} on {be}: {why}")
            continue
        result = fn(*args)
        yield be, bench_as(be, lambda fn=fn: fn(*args), device), result


def ratio(a: Timing, b: Timing) -> float:
    """How many times `b` fits in `a`, by medians (`ratio(original, ours)` = speedup)."""
    return round(a.p50_ms / b.p50_ms, 2)


def sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (keeps tiny CPU times and rates readable)."""
    return float(f"{x:.{digits}g}")


def kernels_label(info: dict) -> str:
    """A result's `info["kernels"]` as one cell: 'op=impl op=impl'."""
    return " ".join(f"{op}={impl}" for op, impl in info.get("kernels", {}).items())


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), or the machine type elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """The GPU's name, or the CPU's architecture, model, vector ISA torch uses and threads:
    CPU results (the float order of its kernels) and times depend on all of them."""
    if is_cuda(device) and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    isa = torch.backends.cpu.get_cpu_capability()
    return f"cpu ({platform.machine()}, {cpu_model()}, {isa}, {os.cpu_count()} threads)"


def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda}


def row(kernel: str, backend: str, shape, dtype, device, timing: Timing, **extra) -> dict:
    """One result row; `extra` columns follow the common ones (None values are dropped)."""
    r = {
        "kernel": kernel,
        "backend": backend,
        "shape": "x".join(str(s) for s in shape) if not isinstance(shape, str) else shape,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device_name(device),
        **versions(),
        "p20_ms": sig(timing.p20_ms),
        "median_ms": sig(timing.p50_ms),
        "p80_ms": sig(timing.p80_ms),
        "reps": timing.reps,
        "timer": timing.timer,
    }
    note = simulated(backend.split("+")[0], device)
    if note:
        r["note"] = note
    r.update({k: v for k, v in extra.items() if v is not None})
    return r


def write_rows(rows: list[dict], out: str | None) -> None:
    """Print rows as a table and, if `out` is given, write `out.json` and `out.csv`."""
    if not rows:
        print("no rows")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "")) for k in keys))
    if out:
        base = Path(out)
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        with base.with_suffix(".csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


def dense_layer_hessians(model, calib, blocks, skip: tuple[str, ...] = ()) -> dict:
    """`{"block.name": (HessianAccumulator, linear)}` for the linears of the decoder blocks
    `blocks` (indices), from the dense model's own forward over `calib` (one sample at a
    time); linears whose name ends with one of `skip` are left out."""
    import fastprune as fp
    from fastprune.models import find_blocks, find_linears, get_weight

    _, block_list = find_blocks(model)
    accs, hooks = {}, []
    for b in blocks:
        for name, lin in find_linears(block_list[b]).items():
            if skip and name.endswith(skip):
                continue
            key = f"{b}.{name}"
            accs[key] = (fp.HessianAccumulator(get_weight(lin).shape[1]), lin)
            hooks.append(
                lin.register_forward_pre_hook(
                    lambda mod, inp, k=key: accs[k][0].add_batch(inp[0].detach())
                )
            )
    try:
        with torch.no_grad():
            for i in range(calib.shape[0]):
                model(calib[i : i + 1])
    finally:
        for h in hooks:
            h.remove()
    return accs
