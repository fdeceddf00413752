"""Distributed pruning: 1 vs N gloo processes on the CPU on the built-in model, and
a cost model for N GPUs on the LLaMA-2-7B / 70B shapes.

Measurement: `prune_model` on `--model` (default the built-in smollm2-135m, `fastprune.
load_model`) in 1 process and in N gloo processes (each with threads / N threads, so every
run uses the same cores), the first `--blocks` decoder blocks only, after an untimed warm-up
prune of a 1-block copy in every process; rows give the wall time,
the speedup over 1 process and where the time goes (each rank's calibration = its own
forwards and Hessians, its solves, its time inside collectives = communication plus waiting
for the others), the bytes reduced and broadcast, and the largest relative difference of a
layer's loss from the 1-process run.

    python -m benchmarks.bench_distributed                      # 1 and 2 processes, CPU
    python -m benchmarks.bench_distributed --quick              # a smoke run
    python -m benchmarks.bench_distributed --cost-model [--nccl-gbps 100]

Cost model (`--cost-model`): the time per decoder block on N GPUs projected from one GPU's
measured per-block times (default: `benchmarks/results/h100/e2e_llama2-7b_2blocks_
fasthessian.json`, LLaMA-2-7B shape, ROSE 50%, 128x2048 calibration: calibration = forwards
with Hessians, solve, other = the rest) and from the bytes the pipeline moves per block:

- calibration and other: split over the ranks by samples (the largest shard, ceil(n/N));
- solve: the most loaded rank's share of the block's `rows*cols^2` (the pipeline's own plan,
  `fastprune.pipeline.distributed.plan_block`); the largest layer (down_proj) bounds it,
  unless the method solves rows independently (Wanda, GBLM, SparseSwaps, N:M SparseGPT:
  `--method`, `--pattern`) and `--row-split auto` cuts the layers costlier than an even
  share into row ranges on several ranks;
- communication (no overlap): each distinct H (`cols^2` float64) summed onto its owners, a
  reduce (`bytes/B`) or, when layers fed one input have several owners, an all_reduce
  (`2(N-1)/N bytes/B`); each pruned weight (float16) broadcast (`bytes/B`, by parts); plus
  `--latency-us` per collective. B = `--nccl-gbps`.

The 70B shape has no measured run: its times are the 7B ones scaled by work per token (calibration:
`2*params + 2*sum cols^2` over the distinct Hessians; solve: `sum rows*cols^2`; other:
hidden size); `--times SHAPE=CALIB,SOLVE,OTHER` (seconds per block on one GPU) replaces them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

from benchmarks.harness import device_name, row, versions, write_rows
from fastprune.methods import get_method
from fastprune.timing import Timing

E2E_RESULT = Path(__file__).parent / "results" / "h100" / "e2e_llama2-7b_2blocks_fasthessian.json"
# hidden, intermediate, heads, kv heads, layers (as bench_end_to_end.SHAPES)
SHAPES = {
    "llama2-7b": (4096, 11008, 32, 32, 32),
    "llama2-70b": (8192, 28672, 64, 8, 80),
}
FALLBACK_7B = (0.89, 0.42, 0.428)  # the same file's figures, if it is missing
COLLECTIVES_PER_BLOCK = 6  # guard checks, Hessian groups, counts, reports (+ one per H/weight)


# ------------------------------------------------------------------------------ measuring


def _truncate(model, blocks: int | None) -> int:
    """Keep the first `blocks` decoder blocks (all if None); returns the count kept."""
    from fastprune.models import find_blocks

    path, block_list = find_blocks(model)
    if blocks is None or blocks >= len(block_list):
        return len(block_list)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, torch.nn.ModuleList(list(block_list)[:blocks]))
    if hasattr(model, "config"):
        model.config.num_hidden_layers = blocks
    return blocks


def _rank(rank: int, nproc: int, init: str, cfg: dict, out: str) -> None:
    import torch.distributed as dist

    import fastprune as fp

    torch.set_num_threads(max(1, cfg["threads"] // nproc))
    if nproc > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=nproc)
    try:
        model, _ = fp.load_model(cfg["model"])
        _truncate(model, cfg["blocks"])
        calib = torch.load(cfg["calib"])
        opts = {"backend": "torch"} if cfg["method"] in ("sparsegpt", "rose") else {}
        # untimed warm-up on a 1-block copy (lazy imports, first calls), as every rank
        small = copy.deepcopy(model)
        _truncate(small, 1)
        fp.prune_model(
            small, calib[:nproc], method=cfg["method"], sparsity=cfg["sparsity"], progress=False,
            **opts,
        )  # fmt: skip
        del small
        if nproc > 1:
            dist.barrier()  # start together: loading is not timed
        t0 = time.perf_counter()
        rep = fp.prune_model(
            model, calib, method=cfg["method"], sparsity=cfg["sparsity"], progress=False,
            **opts,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        if rank == 0:
            doc = {"seconds": seconds, "totals": rep.totals}
            doc["losses"] = {lr.name: lr.loss for lr in rep.layers}
            Path(out).write_text(json.dumps(doc))
    finally:
        if nproc > 1:
            dist.destroy_process_group()


def measure_processes(cfg: dict, nproc: int, workdir: Path) -> dict:
    """One timed `prune_model` on `nproc` spawned processes (1: no process group)."""
    import torch.multiprocessing as tmp_mp

    out = workdir / f"result{nproc}.json"
    init = f"file://{workdir / f'rendezvous{nproc}'}"
    tmp_mp.start_processes(
        _rank, args=(nproc, init, cfg, str(out)), nprocs=nproc, start_method="spawn"
    )
    return json.loads(out.read_text())


def measure(args) -> list[dict]:
    import tempfile

    import fastprune as fp
    from fastprune.data import get_calibration

    threads = args.threads or torch.get_num_threads()
    _, tok = fp.load_model(args.model)
    calib = get_calibration("builtin", tok, args.nsamples, args.seqlen, args.seed)
    rows, base = [], None
    with tempfile.TemporaryDirectory() as d:
        torch.save(calib, f"{d}/calib.pt")
        cfg = dict(
            model=args.model,
            blocks=args.blocks,
            method=args.method,
            sparsity=args.sparsity,
            threads=threads,
            calib=f"{d}/calib.pt",
        )
        for nproc in args.nprocs:
            res = measure_processes(cfg, nproc, Path(d))
            base = base or res
            t = res["totals"]
            blocks = t["blocks"]
            diffs = [
                abs(res["losses"][k] - v) / max(abs(v), 1e-30)
                for k, v in base["losses"].items()
                if v is not None
            ]
            per_rank = {
                "calibration_s": t.get("rank_calibration_seconds", [t["forward_seconds"]]),
                "solve_s": t.get("rank_solve_seconds", [t["solve_seconds"]]),
                "collectives_s": t.get("rank_comm_seconds", [0.0]),
            }
            rows.append(
                row(
                    "prune_model",
                    "torch",
                    f"{args.model} ({blocks} blocks)",
                    torch.float32,
                    "cpu",
                    Timing.once(res["seconds"] * 1e3),
                    method=args.method,
                    calibration=f"{args.nsamples}x{args.seqlen}",
                    nproc=nproc,
                    threads_per_process=max(1, threads // nproc),
                    backend_dist=t.get("backend"),
                    seconds=round(res["seconds"], 3),
                    seconds_per_block=round(res["seconds"] / blocks, 3),
                    speedup_vs_1=round(base["seconds"] / res["seconds"], 3),
                    efficiency=round(base["seconds"] / res["seconds"] / nproc, 3),
                    **{f"rank_{k}": "/".join(f"{x:.2f}" for x in v) for k, v in per_rank.items()},
                    capture_s=round(t["capture_seconds"], 3),
                    hessian_forward_s=round(t["hessian_seconds"], 3),
                    propagate_s=round(t["propagate_seconds"], 3),
                    reduced_mb=round(t.get("reduced_bytes", 0) / 2**20, 2),
                    broadcast_mb=round(t.get("broadcast_bytes", 0) / 2**20, 2),
                    max_rel_loss_diff_vs_1=float(f"{max(diffs, default=0.0):.3g}"),
                )
            )
    return rows


# ----------------------------------------------------------------------------- cost model


def block_layers(shape: str) -> dict[str, tuple[int, int, str]]:
    """{name: (rows, cols, the input it reads)} of one LLaMA decoder block."""
    h, inter, heads, kv, _ = SHAPES[shape]
    kvd = h // heads * kv
    return {
        "q_proj": (h, h, "attn_in"),
        "k_proj": (kvd, h, "attn_in"),
        "v_proj": (kvd, h, "attn_in"),
        "o_proj": (h, h, "o_in"),
        "gate_proj": (inter, h, "mlp_in"),
        "up_proj": (inter, h, "mlp_in"),
        "down_proj": (h, inter, "down_in"),
    }


def work_per_token(shape: str) -> tuple[float, float, float]:
    """(calibration flops per token, solve work rows*cols^2 summed, hidden size)."""
    layers = block_layers(shape)
    params = sum(r * c for r, c, _ in layers.values())
    hcols = {src: c for _, c, src in layers.values()}
    calib = 2 * params + 2 * sum(c * c for c in hcols.values())
    solve = sum(r * c * c for r, c, _ in layers.values())
    return calib, solve, SHAPES[shape][0]


def measured_7b(path: Path = E2E_RESULT) -> tuple[tuple[float, float, float], str, str, int]:
    """(calibration, solve, other) seconds per block on one GPU from an e2e result row, its
    method, its source and its calibration sample count."""
    try:
        (r,) = json.loads(path.read_text())
    except (OSError, ValueError):
        return FALLBACK_7B, "rose", "built-in figures (results file missing)", 128
    blocks = int(r["shape"].split("(")[1].split("/")[0])
    calib, solve = r["forward_s"] / blocks, r["solve_s"] / blocks
    other = r["seconds_per_block"] - calib - solve
    nsamples = int(r.get("calibration", "128x").split("x")[0])
    src = f"{path.name} ({r['device']}, {r['dtype']}, {r['method']} {r['calibration']})"
    return (calib, solve, other), r["method"], src, nsamples


def project(
    shape: str,
    times: tuple[float, float, float],
    nproc: int,
    nsamples: int,
    gbps: float,
    latency_us: float,
    shares_inverse: bool,
    weight_bytes: int = 2,
    separable: bool = False,
    row_split: str = "auto",
) -> dict:
    """The projected time of one decoder block on `nproc` GPUs (see the module docstring)."""
    from fastprune.pipeline.distributed import plan_block

    calib, solve, other = times
    layers = block_layers(shape)
    lins = {k: torch.nn.Linear(c, r, bias=False, device="meta") for k, (r, c, _) in layers.items()}
    first = {}
    leader = {k: first.setdefault(src, k) for k, (_, _, src) in layers.items()}
    plan = plan_block(lins, leader, shares_inverse, nproc, separable, row_split)
    cost = {k: r * c * c for k, (r, c, _) in layers.items()}
    load = [0.0] * nproc
    for k, parts in plan.items():
        rows = layers[k][0]
        for part in parts:
            load[part.rank] += cost[k] * (part.stop - part.start) / rows
    total = sum(cost.values())
    shard = math.ceil(nsamples / nproc) / nsamples
    bw = gbps * 1e9
    comm = reduced = broadcast = 0.0
    collectives = COLLECTIVES_PER_BLOCK
    if nproc > 1:
        for src in dict.fromkeys(s for _, _, s in layers.values()):
            cols = next(c for _, c, s in layers.values() if s == src)
            nbytes = cols * cols * 8
            dests = {p.rank for k, (_, _, s) in layers.items() if s == src for p in plan[k]}
            comm += nbytes / bw * (1 if len(dests) == 1 else 2 * (nproc - 1) / nproc)
            reduced += nbytes
            collectives += 1
        for k, (r, c, _) in layers.items():
            broadcast += r * c * weight_bytes
            comm += r * c * weight_bytes / bw
            collectives += len(plan[k])
        comm += collectives * latency_us * 1e-6
    t_calib, t_other = calib * shard, other * shard
    t_solve = solve * max(load) / total
    per_block = t_calib + t_other + t_solve + comm
    one = calib + solve + other
    return {
        "calibration_s": t_calib,
        "other_s": t_other,
        "solve_s": t_solve,
        "comm_s": comm,
        "per_block_s": per_block,
        "speedup": one / per_block,
        "efficiency": one / per_block / nproc,
        "calib_solve_efficiency": (calib + solve) / (t_calib + t_solve + comm) / nproc,
        "reduced_mb": reduced / 2**20,
        "broadcast_mb": broadcast / 2**20,
        "largest_layer_share": max(cost.values()) / total,
        "row_parts": sum(len(ps) for ps in plan.values()) - len(plan),
    }


def cost_model(args) -> list[dict]:
    base, method, src, nsamples = measured_7b()
    given = {}
    for spec in args.times or []:
        name, _, vals = spec.partition("=")
        if name not in SHAPES:
            raise SystemExit(f"--times: unknown shape {name!r} (one of {', '.join(SHAPES)})")
        try:
            given[name] = tuple(float(v) for v in vals.split(","))
            assert len(given[name]) == 3
        except (ValueError, AssertionError):
            raise SystemExit(f"--times {spec!r}: want SHAPE=CALIB,SOLVE,OTHER seconds") from None
    w7 = work_per_token("llama2-7b")
    meth = get_method(args.method or method)
    prune_n = int(args.pattern.split(":")[0]) if ":" in args.pattern else 0
    shares = meth.shares_inverse
    separable = meth.separable(prune_n, meth.check_options({}))
    rows = []
    for shape in SHAPES:
        if shape in given:
            times, origin = given[shape], "--times"
        elif shape == "llama2-7b":
            times, origin = base, src
        else:
            w = work_per_token(shape)
            times = (base[0] * w[0] / w7[0], base[1] * w[1] / w7[1], base[2] * w[2] / w7[2])
            origin = f"7B figures scaled by work per token ({src})"
        layers = SHAPES[shape][4]
        for n in args.gpus:
            p = project(
                shape, times, n, nsamples, args.nccl_gbps, args.latency_us, shares,
                separable=separable, row_split=args.row_split,
            )  # fmt: skip
            rows.append(
                {
                    "kernel": "cost_model",
                    "shape": shape,
                    "method": args.method or method,
                    "pattern": args.pattern,
                    "row_split": args.row_split if separable else "not separable",
                    "gpus": n,
                    "nccl_gbps": args.nccl_gbps,
                    **{k: round(v, 4) for k, v in p.items()},
                    "projected_model_s": round(p["per_block_s"] * layers, 1),
                    "times_from": origin,
                    **versions(),
                }
            )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m", help="as for `fastprune prune --model`")
    ap.add_argument("--method", default=None, help="default sparsegpt (cost model: the file's)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=None, help="prune only the first N blocks")
    ap.add_argument("--nprocs", default="1,2", help="process counts to measure (first: base)")
    ap.add_argument("--threads", type=int, default=None, help="threads in all (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="4x64 calibration, 2 blocks")
    ap.add_argument("--cost-model", action="store_true", help="project N GPUs instead")
    ap.add_argument("--gpus", default="1,2,4,8", help="cost model: GPU counts")
    ap.add_argument("--nccl-gbps", type=float, default=100.0, help="cost model: GB/s per link")
    ap.add_argument("--latency-us", type=float, default=30.0, help="cost model: per collective")
    ap.add_argument("--pattern", default="50%", help="cost model: 50%% or N:M (row splitting)")
    ap.add_argument(
        "--row-split",
        default="auto",
        choices=("auto", "never"),
        help="cost model: split a separable method's large layers' rows (FASTPRUNE_ROW_SPLIT)",
    )
    ap.add_argument("--times", action="append", help="cost model: SHAPE=CALIB,SOLVE,OTHER")
    ap.add_argument("--out", default=None, help="write OUT.json / OUT.csv")
    args = ap.parse_args(argv)
    if args.cost_model:
        args.gpus = [int(x) for x in args.gpus.split(",")]
        if min(args.gpus) < 1 or args.nccl_gbps <= 0 or args.latency_us < 0:
            ap.error("--gpus must be >= 1, --nccl-gbps > 0, --latency-us >= 0")
        rows = cost_model(args)
    else:
        args.method = args.method or "sparsegpt"
        args.nprocs = [int(x) for x in args.nprocs.split(",")]
        if min(args.nprocs) < 1:
            ap.error("--nprocs must be >= 1")
        if args.quick:
            args.nsamples, args.seqlen = 4, 64
            args.blocks = args.blocks or 2
        if max(args.nprocs) > args.nsamples:
            ap.error(f"--nprocs {max(args.nprocs)} is larger than --nsamples {args.nsamples}")
        print(f"{device_name('cpu')}; {os.cpu_count()} cores")
        rows = measure(args)
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
