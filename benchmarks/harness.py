"""Shared benchmark harness: medians via triton.testing.do_bench on CUDA (a plain
perf_counter median on CPU), environment facts, and JSON/CSV rows.

Every row: kernel, backend, shape, dtype, device, torch, triton, median_ms (+ optional
work columns such as tflops / gbps computed from counted work)."""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda}


def bench(fn, device: str, warmup: int = 1, rep: int = 3, quantiles=None) -> float:
    """Median milliseconds of `fn()`; do_bench (L2 flushed, synchronised) on CUDA."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def row(kernel: str, backend: str, shape, dtype, device: str, median_ms: float, **extra) -> dict:
    r = {
        "kernel": kernel,
        "backend": backend,
        "shape": "x".join(str(s) for s in shape) if not isinstance(shape, str) else shape,
        "dtype": str(dtype).replace("torch.", ""),
        "device": device_name(device),
        **versions(),
        "median_ms": round(median_ms, 4),
    }
    r.update(extra)
    return r


def write_rows(rows: list[dict], out: str | None) -> None:
    """Print rows as a table and, if `out` is given, write `out.json` and `out.csv`."""
    if not rows:
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
