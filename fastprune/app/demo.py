"""Layer-level demo on a synthetic LLM-like layer: what each method does, side by side."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

import fastprune as fp


def run_demo(
    rows: int = 512,
    cols: int = 1024,
    sparsity: float = 0.5,
    seed: int = 0,
    device: str = "cpu",
    backend: str = "auto",
) -> list[dict]:
    """Prune one synthetic layer (columnar activations, so ROSE has work to do) with every
    method, unstructured and 2:4, and return one row per run."""
    g = torch.Generator().manual_seed(seed)
    W, H, _ = fp.testing.random_layer(
        rows, cols, nsamples=16, tokens=128, columnar=True, generator=g, device=device
    )
    G = fp.gradient_norm(torch.randn(4, rows, cols, generator=g).to(device) * W.abs())
    runs = []
    for n, m in ((0, 0), (2, 4)):
        kw = {"sparsity": sparsity, "prune_n": n, "prune_m": m}
        runs += [
            ("magnitude", lambda kw=kw: fp.magnitude_layer(W, H, **kw)),
            ("wanda", lambda kw=kw: fp.wanda_layer(W, H, **kw)),
            ("gblm", lambda kw=kw: fp.gblm_layer(W, H, G=G, **kw)),
            ("sparsegpt", lambda kw=kw: fp.sparsegpt_layer(W, H, backend=backend, **kw)),
            ("rose", lambda kw=kw: fp.rose_layer(W, H, backend=backend, **kw)),
            (
                "sparseswaps",
                lambda kw=kw: fp.sparseswaps_layer(W, H, backend=backend, max_swaps=200, **kw),
            ),
        ]
    out = []
    for name, fn in tqdm(runs, desc="pruning demo layer", unit="run"):
        t0 = time.perf_counter()
        r = fn()
        out.append({"result": r, "name": name, "wall": time.perf_counter() - t0})
    return out


def format_table(rows: list[dict]) -> str:
    base = {}
    for r in rows:
        res = r["result"]
        if r["name"] == "magnitude":
            base[res.info["pattern"]] = res.loss
    lines = [
        f"{'method':<12}{'pattern':<14}{'sparsity':>9}{'loss':>13}{'vs magn.':>10}"
        f"{'seconds':>9}  device/backend  notes"
    ]
    for r in rows:
        res = r["result"]
        i = res.info
        notes = ""
        if "reordered" in i:
            notes = f"range={i['relative_range']:.2f} reordered={i['reordered']}"
        if "swaps" in i:
            notes = f"swaps={i['swaps']} steps={i['steps']} from {i['warm_start']}"
        rel = res.loss / base[i["pattern"]] if base.get(i["pattern"]) else float("nan")
        lines.append(
            f"{r['name']:<12}{i['pattern']:<14}{res.sparsity:>9.4f}{res.loss:>13.5g}"
            f"{rel:>10.3f}{r['wall']:>9.3f}  {i['device']}/{i['backend']:<8} {notes}"
        )
    return "\n".join(lines)
