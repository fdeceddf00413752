"""The `fastprune` command line: a parser over `fastprune.workflow` (`PruneJob`, `EvalJob`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import workflow
from .methods import METHODS, methods_with
from .solvers.recipes import REFINE_ON, REFINERS, selectors

# CLI flags that carry a method option: argparse dest -> option name. A flag reaches every
# method in METHODS that declares the option; a flag left at None keeps the method's default.
OPTION_FLAGS = {
    "backend": "backend",
    "max_swaps": "max_swaps",
    "refit_iters": "refit_iters",
    "reconstruct": "reconstruct",
    "refine": "refine",
    "refine_on": "refine_on",
    "gblm_norm": "norm",
}
# a job field or option whose flag is not its name
FLAG_OF = {"norm": "gblm_norm"}


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


def parse_pattern(text: str | None) -> tuple[int, int]:
    """--pattern: '2:4' -> (2, 4); 'unstructured' / 'none' / '' -> (0, 0)."""
    return workflow.parse_pattern(text, "--pattern")


def flag(field: str) -> str:
    """The flag that sets a job's field (or a method option), for error messages."""
    return "--" + FLAG_OF.get(field, field).replace("_", "-")


def _lm_eval(args: argparse.Namespace) -> workflow.LmEval | None:
    if args.lm_eval is None:
        if args.lm_eval_include:
            raise ValueError("--lm-eval-include needs --lm-eval TASKS")
        return None
    return workflow.LmEval(
        args.lm_eval, args.lm_eval_limit, args.lm_eval_batch_size, args.lm_eval_include
    )


def _job_fields(job_class, args: argparse.Namespace, skip: tuple[str, ...]) -> dict:
    """The job's fields that have a flag of the same name."""
    names = [f.name for f in dataclasses.fields(job_class) if f.name not in skip]
    return {k: getattr(args, k) for k in names if hasattr(args, k)}


def prune_job(args: argparse.Namespace) -> workflow.PruneJob:
    """The `prune` flags as a `PruneJob`: a method option flag left unset keeps the method's
    default."""
    options = {o: getattr(args, d) for d, o in OPTION_FLAGS.items() if getattr(args, d) is not None}
    return workflow.PruneJob(
        **_job_fields(workflow.PruneJob, args, ("options", "lm_eval", "progress")),
        options=options,
        lm_eval=_lm_eval(args),
        progress=not args.no_progress,
    )


def _prune(args: argparse.Namespace) -> int:
    import os

    from .launch import launch, launched, prune_command

    job = prune_job(args)
    workflow.check_prune_job(job, flag)
    if job.nproc > 1 and not launched():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "--nproc starts its own processes: do not combine it with torchrun "
                f"(WORLD_SIZE={os.environ['WORLD_SIZE']} is set)"
            )
        status, msg = launch(job.nproc, prune_command(args.argv))
        if msg:
            print(f"fastprune: error: {msg}", file=sys.stderr)
        return status
    workflow.run_checked(job, flag)  # checked above
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.lm_eval is None:
        raise ValueError("--lm-eval TASKS is required (e.g. --lm-eval arc_easy,piqa)")
    job = workflow.EvalJob(
        **_job_fields(workflow.EvalJob, args, ("lm_eval", "progress")),
        lm_eval=_lm_eval(args),
        progress=not args.no_progress,
    )
    workflow.run_eval(job, flag)
    return 0


def _add_run_flags(q: argparse.ArgumentParser) -> None:
    """The flags `prune` and `eval` share: report, seed, output, lm-eval tasks."""
    q.add_argument("--report", default=None, help="write a JSON report here")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("--quiet", action="store_true", help="print nothing but errors")
    _add_lm_eval_flags(q)


def _add_lm_eval_flags(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--lm-eval",
        default=None,
        metavar="TASKS",
        help="zero-shot lm-eval tasks, comma-separated (e.g. arc_easy,piqa); "
        "needs pip install 'fastprune[eval]'",
    )
    q.add_argument(
        "--lm-eval-limit",
        type=float,
        default=None,
        help="at most this many examples per lm-eval task (below 1: a fraction)",
    )
    q.add_argument("--lm-eval-batch-size", type=int, default=1, help="lm-eval requests per forward")
    q.add_argument(
        "--lm-eval-include",
        nargs="+",
        default=None,
        metavar="DIR",
        help="directories of your own lm-eval task YAMLs",
    )


def _reconstruct_arg(text: str):
    if text not in ("best", "best_rows", "lstsq"):
        raise argparse.ArgumentTypeError(
            f"--reconstruct takes no value, 'best', 'best_rows' or 'lstsq', got {text!r}"
        )
    return text


def _for(option: str) -> str:
    return "/".join(methods_with(option))


def build_parser() -> argparse.ArgumentParser:
    from .pipeline.allocation import ALLOCATIONS, OWL_LAMBDA, OWL_THRESHOLD

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

    q = sub.add_parser(
        "prune",
        help="prune a model end to end: calibrate, prune, evaluate perplexity, save",
        description="Prune every linear layer of a causal LM's decoder blocks, block by block,\n"
        "and report dense vs pruned perplexity.",
        epilog="methods:\n" + "\n".join(f"  {k:<12} {m.description}" for k, m in METHODS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (built in), a local HF model directory, a .gguf, or a hub id",
    )
    q.add_argument("--method", default="rose", help=" | ".join(METHODS))
    q.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity in [0, 1)")
    q.add_argument("--pattern", default=None, help="N:M pattern such as 2:4 (overrides --sparsity)")
    q.add_argument("--nsamples", type=int, default=32, help="calibration samples")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per sample / eval window")
    q.add_argument("--calib", default="builtin", help="builtin | FILE | wikitext2 | c4")
    q.add_argument("--eval", default="builtin", help="builtin | FILE | wikitext2 | c4 | none")
    q.add_argument(
        "--eval-windows",
        type=int,
        default=16,
        help="at most this many eval windows of --seqlen tokens (default 16)",
    )
    q.add_argument("--device", default="cpu", help="where blocks run: cpu | cuda | cuda:N")
    q.add_argument("--dtype", default="float32", help="model dtype: float32 | bfloat16 | float16")
    q.add_argument("--batch-size", type=int, default=1, help="calibration samples per forward")
    q.add_argument(
        "--hessian-precision",
        choices=["auto", "exact", "fast"],
        default="auto",
        help="auto: tensor cores (float32 accumulation) for half-precision models on a GPU, "
        "else the reference's float32 arithmetic; exact: always the reference's",
    )
    q.add_argument(
        "--hessian-kind",
        choices=["auto", "full", "diagonal"],
        default="auto",
        help="what is accumulated per layer input: the full H, or its diagonal alone (all "
        "Wanda and GBLM read: no GEMM, cols floats; their layers then report no loss); auto: "
        "the diagonal for those methods, the full H otherwise",
    )
    q.add_argument(
        "--moe-calibration",
        choices=["routed", "all"],
        default="routed",
        help="MoE experts' Hessians: routed (the tokens the router sends each expert) or all "
        "(every token through every expert; the block's output still follows the router)",
    )
    q.add_argument(
        "--asymmetric",
        action="store_true",
        help="fit each layer to the dense model's outputs from the pruned model's inputs "
        "(GPTAQ-style asymmetric calibration: a weight correction before the method prunes; "
        "dense models, one process; twice the calibration forwards and activations)",
    )
    q.add_argument("--targets", nargs="+", default=None, help="glob patterns of layers to prune")
    q.add_argument("--ignore", nargs="+", default=None, help="glob patterns of layers to skip")
    q.add_argument(
        "--max-swaps",
        type=int,
        default=None,
        help=f"{_for('max_swaps')}: steps per layer (default: a per-layer budget on CPU, "
        "a larger one on GPU, and for the fastprune recipe at most 4 at 2:4 and 16 otherwise; "
        "see fastprune.methods)",
    )
    q.add_argument(
        "--reconstruct",
        nargs="?",
        const=True,
        default=None,
        type=_reconstruct_arg,
        metavar="best|best_rows|lstsq",
        help=f"{_for('reconstruct')}/{'/'.join(selectors())}: OBS reconstruction on the final "
        "mask (--reconstruct best: only where it lowers the layer's loss; best_rows: row by "
        "row; lstsq: the least-squares weights on the mask instead, by conjugate gradients)",
    )
    q.add_argument(
        "--refit-iters",
        type=int,
        default=None,
        help=f"{_for('refit_iters')}/{'/'.join(selectors())}: conjugate-gradient iterations of "
        "--reconstruct lstsq per layer (default 32)",
    )
    q.add_argument(
        "--refine",
        default=None,
        choices=REFINERS,
        help=f"{'/'.join(selectors())}/fastprune: refine the method's mask by optimal 1-swaps",
    )
    q.add_argument(
        "--refine-on",
        default=None,
        choices=REFINE_ON,
        help="the kept weights the swaps are scored with: the original W, or the method's "
        "updated weights (sparsegpt/rose; default)",
    )
    q.add_argument(
        "--allocation",
        default="uniform",
        choices=ALLOCATIONS,
        help="layer-wise sparsity: uniform, or owl (outlier-weighted per block, same total; "
        "N:M stays uniform)",
    )
    q.add_argument(
        "--owl-lambda",
        type=float,
        default=OWL_LAMBDA,
        help=f"owl: block sparsities within sparsity +- this (default {OWL_LAMBDA})",
    )
    q.add_argument(
        "--owl-threshold",
        type=float,
        default=OWL_THRESHOLD,
        help=f"owl: an outlier scores above this x its block's mean (default {OWL_THRESHOLD})",
    )
    q.add_argument(
        "--gblm-norm", default=None, choices=["l1", "l2"], help=f"{_for('norm')} gradient norm"
    )
    q.add_argument(
        "--backend",
        default=None,
        choices=["auto", "torch", "triton", "cuda"],
        help=f"kernels for {_for('backend')} (default auto: the fastest for --device)",
    )
    q.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="prune with N local processes (torch.distributed: gloo on CPU, NCCL with one GPU "
        "each for --device cuda when there are >= N GPUs); each calibrates on its share of "
        "the samples and solves its share of the layers. 1: this process only",
    )
    q.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="several processes (--nproc or torchrun): how long a process waits for the "
        "others at a synchronisation point before failing (default $FASTPRUNE_DIST_TIMEOUT "
        "or 1800; it covers rank 0's dense evaluation before pruning)",
    )
    q.add_argument("--save", default=None, help="save the pruned model (safetensors) here")
    q.add_argument(
        "--stream",
        dest="stream",
        action="store_const",
        const=True,
        default=None,
        help="prune a local safetensors checkpoint block by block from disk, writing --save as "
        "it goes (default: only when the model would not fit in the free host memory)",
    )
    q.add_argument(
        "--no-stream",
        dest="stream",
        action="store_const",
        const=False,
        help="load the whole model even when it looks too big for the free host memory",
    )
    _add_run_flags(q)
    q.set_defaults(func=_prune)

    e = sub.add_parser(
        "eval",
        help="zero-shot lm-eval tasks on a model (no pruning)",
        description="Run lm-evaluation-harness tasks on a model as loaded by `prune`.",
    )
    e.add_argument("--model", default="smollm2-135m", help="as for `prune`")
    e.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    e.add_argument("--dtype", default="float32", help="model dtype: float32 | bfloat16 | float16")
    _add_run_flags(e)
    e.set_defaults(func=_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        from .launch import PEER_FAILED_EXIT
        from .pipeline.distributed import RankFailedError

        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f"rank {os.environ.get('RANK', '?')}: " if world > 1 else ""
        print(f"fastprune: error: {rank}{e}", file=sys.stderr)
        return PEER_FAILED_EXIT if isinstance(e, RankFailedError) else 2


if __name__ == "__main__":
    sys.exit(main())
