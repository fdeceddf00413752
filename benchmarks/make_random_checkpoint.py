"""A random LLaMA checkpoint (bfloat16, LLaMA-7B block shapes: hidden 4096, intermediate
11008, 32 heads, vocab 32000) written with `fastprune.streaming.CheckpointWriter` one block at
a time, so it can be as large as the disk allows while host memory holds about one block (the
shard being buffered, by default one block's size). The default 14 blocks make ~6.2 GB, a
model to try streaming pruning on. No tokenizer is written (config and weights only).

    python -m benchmarks.make_random_checkpoint /tmp/llama-random            # ~6.2 GB
    python -m benchmarks.make_random_checkpoint /tmp/tiny --blocks 1 --hidden 256 --vocab 1000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastprune.streaming import CheckpointWriter, params_on_meta, verify_streamed


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("--blocks", type=int, default=14, help="decoder blocks (default 14: ~6.2 GB)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=None, help="default: hidden * 11008 / 4096")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument(
        "--shard-mb", type=float, default=None, help="shard size (default: one block's bytes)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--verify", action="store_true", help="read every tensor back and compare hashes"
    )
    return p


def llama_config(args):
    from transformers import LlamaConfig

    inter = args.intermediate or args.hidden * 11008 // 4096
    if args.blocks < 1 or args.hidden % args.heads:
        raise SystemExit("--blocks must be >= 1 and --hidden a multiple of --heads")
    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=inter,
        num_hidden_layers=args.blocks,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def random_tensor(shape: torch.Size, name: str, gen: torch.Generator) -> torch.Tensor:
    """Norm weights near 1, everything else normal(0, 0.02), in bfloat16."""
    if name.endswith("norm.weight"):
        return 1 + 0.05 * torch.randn(shape, generator=gen).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    from transformers import AutoModelForCausalLM

    cfg = llama_config(args)
    with params_on_meta():  # shapes and names only: no weight is allocated
        skel = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    shapes = {n: p.shape for n, p in skel.named_parameters()}
    block = [n for n in shapes if n.startswith("model.layers.0.")]
    block_bytes = sum(shapes[n].numel() * 2 for n in block)
    shard = int(args.shard_mb * 2**20) if args.shard_mb else block_bytes
    total = sum(s.numel() * 2 for s in shapes.values())
    print(f"{args.blocks} blocks of {block_bytes / 1e9:.3f} GB; {total / 1e9:.3f} GB in all")
    order = [n for n in shapes if not n.startswith("model.layers.")]
    order[1:1] = [n for n in shapes if n.startswith("model.layers.")]  # embed, blocks, rest
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    with CheckpointWriter(args.out, max_shard_bytes=shard) as w:
        for name in order:  # one tensor at a time; the writer keeps at most one shard
            w.add(name, random_tensor(shapes[name], name, gen))
        out = w.finish(cfg)
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(
        f"wrote {out}: {len(files)} shard(s), {size / 1e9:.3f} GB on disk "
        f"({w.written_bytes / 1e9:.3f} GB of tensors) in {time.perf_counter() - start:.1f} s"
    )
    if args.verify:
        print("verified:", verify_streamed(out, w.digests))


if __name__ == "__main__":
    main()
