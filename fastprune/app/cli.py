"""The `fastprune` command line: a parser over `fastprune.app.workflow` (`PruneJob`, `EvalJob`)."""

from __future__ import annotations

import argparse
import sys

from ..config import METHOD_FLAGS, add_arguments, add_method_flags, flag_of, options
from ..methods import METHODS
from ..validation import BACKENDS
from . import workflow

# CLI flags that carry a method option: argparse dest -> option name (`METHOD_FLAGS`). A flag
# reaches every method in METHODS that declares the option; a flag left at None keeps the
# method's default.
OPTION_FLAGS = {f.dest: f.option for f in METHOD_FLAGS}


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
    return flag_of(field, workflow.PruneJob, workflow.EvalJob)


def _lm_eval(args: argparse.Namespace) -> workflow.LmEval | None:
    if args.lm_eval is None:
        if args.lm_eval_include:
            raise ValueError("--lm-eval-include needs --lm-eval TASKS")
        return None
    return workflow.LmEval(
        args.lm_eval, args.lm_eval_limit, args.lm_eval_batch_size, args.lm_eval_include
    )


def _job_fields(job_class, args: argparse.Namespace) -> dict:
    """The job's fields that its declared options' flags set."""
    declared = options(job_class)
    return {k: getattr(args, k) for k, o in declared.items() if o.flag_name and o.argument}


def prune_job(args: argparse.Namespace, job: type | None = None) -> workflow.PruneJob:
    """The `prune` flags as a `PruneJob` (or `job`, a class from `workflow.job_for`): a method
    option flag left unset keeps the method's default."""
    job = workflow.PruneJob if job is None else job
    options_given = {o: getattr(args, d) for d, o in OPTION_FLAGS.items()}
    return job(
        **_job_fields(job, args),
        options={k: v for k, v in options_given.items() if v is not None},
        lm_eval=_lm_eval(args),
        stream=args.stream,
        sym=args.sym,
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
    job = workflow.EvalJob(**_job_fields(workflow.EvalJob, args), lm_eval=_lm_eval(args))
    workflow.run_eval(job, flag)
    return 0


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


def build_parser(job: type | None = None) -> argparse.ArgumentParser:
    """The command's parser; the `prune` flags are generated from `job`'s declared options
    (default `workflow.PruneJob`: `PruneConfig`'s and the workflow's) and `METHOD_FLAGS`."""
    job = workflow.PruneJob if job is None else job
    p = argparse.ArgumentParser(prog="fastprune", description="Fast, exact one-shot LLM pruning")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="prune one synthetic layer with every method")
    d.add_argument("--rows", type=int, default=512)
    d.add_argument("--cols", type=int, default=1024)
    d.add_argument("--sparsity", type=float, default=0.5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--backend", default="auto", choices=BACKENDS)
    d.set_defaults(func=_demo)

    q = sub.add_parser(
        "prune",
        help="prune a model end to end: calibrate, prune, evaluate perplexity, save",
        description="Prune every linear layer of a causal LM's decoder blocks, block by block,\n"
        "and report dense vs pruned perplexity. docs/options.md lists every option.",
        epilog="methods:\n" + "\n".join(f"  {k:<12} {m.description}" for k, m in METHODS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(q, job)
    add_method_flags(q)
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
    q.add_argument(
        "--sym",
        dest="sym",
        action="store_const",
        const=True,
        default=None,
        help="--quant: a symmetric integer grid (the presets' default)",
    )
    q.add_argument(
        "--asym", dest="sym", action="store_const", const=False,
        help="--quant: an asymmetric integer grid (a zero point per group)",
    )  # fmt: skip
    _add_lm_eval_flags(q)
    q.set_defaults(func=_prune)

    e = sub.add_parser(
        "eval",
        help="zero-shot lm-eval tasks on a model (no pruning)",
        description="Run lm-evaluation-harness tasks on a model as loaded by `prune`.",
    )
    add_arguments(e, workflow.EvalJob)
    _add_lm_eval_flags(e)
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
        from ..pipeline.distributed import RankFailedError
        from .launch import PEER_FAILED_EXIT

        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f"rank {os.environ.get('RANK', '?')}: " if world > 1 else ""
        print(f"fastprune: error: {rank}{e}", file=sys.stderr)
        return PEER_FAILED_EXIT if isinstance(e, RankFailedError) else 2


if __name__ == "__main__":
    sys.exit(main())
