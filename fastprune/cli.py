"""The `fastprune` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import format_table, run_demo

    rows = run_demo(args.rows, args.cols, args.sparsity, args.seed, args.device, args.backend)
    print(
        f"fastprune demo: one synthetic {args.rows}x{args.cols} layer (columnar activations),"
        f" sparsity {args.sparsity}, torch {torch.__version__}"
    )
    print(format_table(rows))
    print("loss = tr((W - W_p) H (W - W_p)^T) = 2/n ||(W - W_p) X||^2 over the calibration set")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastprune", description="Fast, exact one-shot LLM pruning")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="prune one synthetic layer with every method")
    d.add_argument("--rows", type=int, default=512)
    d.add_argument("--cols", type=int, default=1024)
    d.add_argument("--sparsity", type=float, default=0.5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"fastprune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
