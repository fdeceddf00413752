"""End to end: `prune_model` on a LLaMA-shaped model with random weights (target: LLaMA-2-7B
shape, 128x2048 calibration, ROSE 50%, one GPU, <= 60 s; 70B shape <= 10 min projected from
the time per decoder block).

Only `--blocks` decoder blocks are built (random weights are fine for timing); the full
model's time is projected as (measured seconds / blocks) x the shape's layer count, which
slightly overstates it (embedding and first-block capture are counted once per block).

    python -m benchmarks.bench_end_to_end --shape llama2-7b --device cuda [--blocks 32]
    python -m benchmarks.bench_end_to_end --shape small --device cpu --nsamples 8 --seqlen 256
    python -m benchmarks.bench_end_to_end --shape qwen3-30b-a3b --blocks 1 --method sparsegpt

`qwen3-30b-a3b` is one Qwen3-30B-A3B block (hidden 2048, 128 experts of 768x2048, top-8):
its experts are solved as batches per projection (`fastprune.solvers.sparsegpt_batched`).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.harness import row, write_rows
from fastprune.timing import Timing

SHAPES = {
    # hidden, intermediate, heads, kv heads, layers
    "llama2-7b": (4096, 11008, 32, 32, 32),
    "llama2-13b": (5120, 13824, 40, 40, 40),
    "llama2-70b": (8192, 28672, 64, 8, 80),
    "small": (512, 1376, 8, 8, 4),
}
# MoE shapes (Qwen3-MoE blocks): hidden, expert intermediate, experts, top-k, heads, kv heads,
# head dim, layers. The vocabulary is cut to 32000 (it only sizes the embedding and the head).
MOE_SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8, 32, 4, 128, 48),
    "moe-small": (512, 256, 16, 4, 8, 4, 64, 4),
}


def layer_count(shape: str) -> int:
    return (MOE_SHAPES[shape] if shape in MOE_SHAPES else SHAPES[shape])[-1]


def build_model(shape: str, blocks: int, seqlen: int, dtype: torch.dtype):
    """A LLaMA (or Qwen3-MoE) model of `shape` with only `blocks` decoder blocks, random
    weights, on CPU."""
    if shape in MOE_SHAPES:
        return build_moe_model(shape, blocks, seqlen, dtype)
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv, _ = SHAPES[shape]
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=blocks,
        max_position_embeddings=max(seqlen, 128),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def build_moe_model(shape: str, blocks: int, seqlen: int, dtype: torch.dtype):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    hidden, inter, experts, top_k, heads, kv, head_dim, _ = MOE_SHAPES[shape]
    cfg = Qwen3MoeConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        moe_intermediate_size=inter,
        num_experts=experts,
        num_experts_per_tok=top_k,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        num_hidden_layers=blocks,
        max_position_embeddings=max(seqlen, 128),
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).to(dtype).eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES) + sorted(MOE_SHAPES), default="small")
    ap.add_argument("--blocks", type=int, default=None, help="blocks to build (default: all)")
    ap.add_argument("--method", default="rose")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default=None, help="N:M, e.g. 2:4")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--hessian-precision", default="auto", choices=["auto", "exact", "fast"])
    ap.add_argument("--out", default=None, help="write OUT.json / OUT.csv")
    ap.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed warm-up prune of a 1-block model (JIT compilation, extension "
        "build, autoselect) that precedes the timed run",
    )
    args = ap.parse_args(argv)

    import fastprune as fp

    layers = layer_count(args.shape)
    blocks = args.blocks or layers
    dtype_name = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    n, m = (int(x) for x in args.pattern.split(":")) if args.pattern else (0, 0)

    t = time.perf_counter()
    model = build_model(args.shape, blocks, args.seqlen, dtype)
    build_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=g)
    opts = {} if args.method in ("magnitude", "wanda", "gblm") else {"backend": args.backend}
    warmup_s = 0.0
    if not args.no_warmup:
        # same layer shapes, so the same kernels compile (and autoselect runs) here, untimed
        t = time.perf_counter()
        small = build_model(args.shape, 1, 128, dtype)
        fp.prune_model(
            small,
            calib[:2, :128],
            method=args.method,
            sparsity=args.sparsity,
            prune_n=n,
            prune_m=m,
            device=args.device,
            progress=False,
            **opts,
        )
        del small
        warmup_s = time.perf_counter() - t
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    rep = fp.prune_model(
        model,
        calib,
        method=args.method,
        sparsity=args.sparsity,
        prune_n=n,
        prune_m=m,
        device=args.device,
        hessian_precision=args.hessian_precision,
        **opts,
    )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    per_block = seconds / blocks
    totals = rep.totals
    print(rep.summary())
    # what ran: every implementation named in the layers' info["kernels"] (torch if none)
    used = sorted({impl for lr in rep.layers for impl in lr.info.get("kernels", {}).values()})
    r = row(
        "prune_model",
        "+".join(used) or "torch",
        f"{args.shape} ({blocks}/{layers} blocks)",
        dtype,
        args.device,
        Timing.once(seconds * 1e3),
        method=args.method,
        hessian_precision=args.hessian_precision,
        pattern=rep.pattern,
        calibration=f"{args.nsamples}x{args.seqlen}",
        seconds=round(seconds, 2),
        seconds_per_block=round(per_block, 3),
        projected_full_model_s=round(per_block * layers, 1),
        solve_s=round(totals.get("solve_seconds", 0.0), 2),
        forward_s=round(totals.get("forward_seconds", 0.0), 2),
        capture_s=round(totals.get("capture_seconds", 0.0), 2),
        hessian_forward_s=round(totals.get("hessian_seconds", 0.0), 2),
        propagate_s=round(totals.get("propagate_seconds", 0.0), 2),
        shared_inverse_s=round(totals.get("inverse_seconds", 0.0), 2),
        expert_solve_s=round(sum(lr.seconds for lr in rep.layers if "tokens" in lr.info), 2),
        other_s=round(
            seconds
            - totals.get("solve_seconds", 0.0)
            - totals.get("forward_seconds", 0.0)
            - totals.get("inverse_seconds", 0.0),
            2,
        ),
        achieved_sparsity=round(rep.achieved_sparsity, 4),
        model_build_s=round(build_s, 1),
        warmup_s=round(warmup_s, 1),
    )
    write_rows([r], args.out)


if __name__ == "__main__":
    main()
