"""The `fastprune` command line."""

from __future__ import annotations

import argparse
import sys

from .methods import METHODS, composed, methods_with
from .solvers.recipes import REFINE_ON, REFINERS, SELECTORS

# CLI flags that carry a method option: argparse dest -> option name. A flag reaches every
# method in METHODS that declares the option; a flag left at None keeps the method's default.
OPTION_FLAGS = {
    "backend": "backend",
    "max_swaps": "max_swaps",
    "reconstruct": "reconstruct",
    "refine": "refine",
    "refine_on": "refine_on",
    "gblm_norm": "norm",
}


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


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4); 'unstructured' / 'none' / '' -> (0, 0)."""
    if text is None or text.strip().lower() in ("", "none", "unstructured"):
        return 0, 0
    parts = text.split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--pattern must look like N:M (e.g. 2:4), got {text!r}") from None
    if not 0 < n < m:
        raise ValueError(f"--pattern N:M needs 0 < N < M, got {text!r}")
    return n, m


def _check_source(spec: str, flag: str, allowed: tuple[str, ...]) -> None:
    """`spec` is one of `allowed` or a non-empty UTF-8 text file (read once to check)."""
    from pathlib import Path

    from .data import read_text_file

    if spec in allowed:
        return
    p = Path(spec).expanduser()
    if not p.is_file():
        raise ValueError(
            f"{flag} {spec!r} is neither one of {', '.join(allowed)} nor a readable text file"
        )
    read_text_file(p, flag)


def _check_output(path: str, flag: str, directory: bool) -> None:
    """An output path that can be written: not an existing file (for a directory) or
    directory (for a file), under an existing directory or one that can be created."""
    import os
    from pathlib import Path

    p = Path(path).expanduser()
    if directory and p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path!r} exists and is not a directory")
    if not directory and p.is_dir():
        raise ValueError(f"{flag} {path!r} is a directory; give a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        if not directory:
            raise ValueError(f"{flag} {path!r}: directory {str(p.parent)!r} does not exist")
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path!r}: directory {str(parent)!r} is not writable")


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_device(spec: str) -> None:
    """--device names a device this machine has."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine")


def check_prune_args(args: argparse.Namespace) -> tuple[int, int]:
    """Every `prune` flag and output path checked before anything is loaded; returns the
    N:M pattern. Errors are `ValueError`s naming the flag."""

    from .data import DATASETS
    from .validation import check_sparsity

    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    n, m = parse_pattern(args.pattern)
    check_sparsity(args.sparsity, "--sparsity")
    for flag, v in (
        ("--nsamples", args.nsamples),
        ("--seqlen", args.seqlen),
        ("--eval-windows", args.eval_windows),
        ("--batch-size", args.batch_size),
    ):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and options_method(args).needs_calibration and args.nproc > args.nsamples:
        raise ValueError(
            f"--nproc {args.nproc} is larger than --nsamples {args.nsamples}: every process "
            "needs at least one calibration sample"
        )
    from .pipeline.distributed import dist_timeout

    dist_timeout(args.dist_timeout, "--dist-timeout")
    if args.max_swaps is not None and args.max_swaps < 0:
        raise ValueError(f"--max-swaps must be >= 0, got {args.max_swaps}")
    takes = (*SELECTORS, "fastprune")
    for flag, v in (("--refine", args.refine), ("--refine-on", args.refine_on)):
        if v is not None and args.method not in takes:
            raise ValueError(f"{flag} applies to --method {'/'.join(takes)}, not {args.method}")
    if args.reconstruct in ("best", "best_rows") and args.method not in takes:
        raise ValueError(f"--reconstruct {args.reconstruct} applies to --method {'/'.join(takes)}")
    from .pipeline.allocation import check_allocation

    try:
        check_allocation(args.allocation, args.owl_threshold, args.owl_lambda)
    except ValueError as e:
        raise ValueError(f"--{str(e).replace('_', '-')}") from None
    if args.dtype not in FLOAT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {args.dtype!r}")
    check_device(args.device)
    _check_source(args.calib, "--calib", ("builtin", *DATASETS))
    if args.eval != "none":
        _check_source(args.eval, "--eval", ("builtin", "none", *DATASETS))
    if args.save:
        _check_output(args.save, "--save", directory=True)
    if args.report:
        _check_output(args.report, "--report", directory=False)
    check_lm_eval_args(args)
    return n, m


def check_lm_eval_args(args: argparse.Namespace) -> None:
    """The --lm-eval* flags (lm-eval itself is imported only when --lm-eval is given)."""
    if args.lm_eval_limit is not None and args.lm_eval_limit <= 0:
        raise ValueError(f"--lm-eval-limit must be > 0, got {args.lm_eval_limit}")
    if args.lm_eval_batch_size < 1:
        raise ValueError(f"--lm-eval-batch-size must be >= 1, got {args.lm_eval_batch_size}")
    if args.lm_eval is None and args.lm_eval_include:
        raise ValueError("--lm-eval-include needs --lm-eval TASKS")


def _load_lm_eval_tasks(args: argparse.Namespace):
    """The --lm-eval tasks, built (datasets fetched) before the model is loaded."""
    if args.lm_eval is None:
        return None
    from .zeroshot import load_tasks

    return load_tasks(
        args.lm_eval, args.lm_eval_include, arg="--lm-eval", include_arg="--lm-eval-include"
    )


def _run_lm_eval(args: argparse.Namespace, tasks, model, tok, label: str, say) -> dict | None:
    if tasks is None:
        return None
    import time

    from .zeroshot import lm_eval_tasks

    say(f"lm-eval {label}: {', '.join(tasks.names)} ...", flush=True)
    t0 = time.perf_counter()
    res = lm_eval_tasks(
        model,
        tok,
        tasks,
        limit=_limit(args.lm_eval_limit),
        batch_size=args.lm_eval_batch_size,
        device=args.device,
        progress=not args.no_progress,
        seed=args.seed,
    )
    say(f"lm-eval {label}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    return res


def _limit(value: float | None):
    """--lm-eval-limit: a whole number is a count of examples, below 1 a fraction."""
    return int(value) if value is not None and value >= 1 and value == int(value) else value


def _lm_eval_report(args: argparse.Namespace, tasks, dense, pruned=None) -> dict | None:
    if tasks is None:
        return None
    doc = {
        "tasks": tasks.names,
        "limit": _limit(args.lm_eval_limit),
        "batch_size": args.lm_eval_batch_size,
        "include": tasks.include,
        "dense": dense,
    }
    if pruned is not None:
        doc["pruned"] = pruned
    return doc


def _prune(args: argparse.Namespace) -> int:
    import os

    import torch.distributed as dist

    from .launch import launch, launched, prune_command
    from .models import resolve_model
    from .pipeline.distributed import init_from_env

    check_prune_args(args)
    resolve_model(args.model)  # unknown model: fail before the slow part
    if args.targets or args.ignore:  # patterns that match nothing: fail before the load too
        from .models import check_selection, find_blocks, model_skeleton

        check_selection(find_blocks(model_skeleton(args.model))[1], args.targets, args.ignore)
    if args.nproc > 1 and not launched():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "--nproc starts its own processes: do not combine it with torchrun "
                f"(WORLD_SIZE={os.environ['WORLD_SIZE']} is set)"
            )
        status, msg = launch(args.nproc, prune_command(args.argv))
        if msg:
            print(f"fastprune: error: {msg}", file=sys.stderr)
        return status
    created = init_from_env(args.dist_timeout, args.device)
    try:
        return _prune_here(args)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _prune_here(args: argparse.Namespace) -> int:
    """`prune` in this process (one rank of several under torchrun or --nproc)."""
    import json
    import time

    import torch

    from .data import get_calibration, get_eval_ids
    from .evaluate import perplexity
    from .models import load_model
    from .pipeline import prune_model
    from .pipeline.distributed import active_world

    t_start = time.perf_counter()
    n, m = parse_pattern(args.pattern)
    torch.manual_seed(args.seed)

    # under torchrun every rank prunes; only rank 0 talks, evaluates and writes files
    lead = active_world() == 1 or torch.distributed.get_rank() == 0
    progress = not args.no_progress and lead
    say = print if lead and not args.quiet else (lambda *a, **k: None)
    # bad task or unreachable dataset: fail early too (rank 0 evaluates)
    lm_tasks = _load_lm_eval_tasks(args) if lead else None

    say(f"loading {args.model} ...", flush=True)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    calib = None
    if options_method(args).needs_calibration:
        calib = get_calibration(args.calib, tok, args.nsamples, args.seqlen, args.seed)
    eval_ids = None if args.eval == "none" or not lead else get_eval_ids(args.eval, tok)

    def ppl(desc):
        if eval_ids is None:
            return None
        r = perplexity(
            model,
            eval_ids,
            args.seqlen,
            max_windows=args.eval_windows,
            device=args.device,
            progress=progress,
            desc=desc,
        )
        say(f"{desc}: {r['ppl']:.3f} ({r['windows']} windows x {args.seqlen} tokens)", flush=True)
        return r

    dense = ppl("perplexity dense")
    zs_dense = _run_lm_eval(args, lm_tasks, model, tok, "dense", say)
    options = method_options(args)
    report = prune_model(
        model,
        calib,
        method=args.method,
        sparsity=args.sparsity,
        prune_n=n,
        prune_m=m,
        device=args.device,
        batch_size=args.batch_size,
        hessian_precision=args.hessian_precision,
        moe_calibration=args.moe_calibration,
        allocation=args.allocation,
        owl_threshold=args.owl_threshold,
        owl_lambda=args.owl_lambda,
        targets=args.targets,
        ignore=args.ignore,
        progress=progress,
        **options,
    )
    pruned = ppl("perplexity pruned")
    zs_pruned = _run_lm_eval(args, lm_tasks, model, tok, "pruned", say)
    saved = None
    if args.save and lead:
        from .saving import save_pruned, verify_saved

        out = save_pruned(model, tok, args.save, report)
        sample = eval_ids[: args.seqlen] if eval_ids is not None else calib[0]
        saved = verify_saved(model, out, report, sample)
        say(
            f"saved to {out} (safetensors + tokenizer); reloaded: sparsity "
            f"{saved['sparsity']:.4f}, max logit difference {saved['max_logit_diff']:g}"
        )
    seconds = time.perf_counter() - t_start
    say(report.summary())
    if dense is not None:
        say(
            f"perplexity ({args.eval}, {dense['windows']}x{args.seqlen} tokens): "
            f"dense {dense['ppl']:.3f} -> pruned {pruned['ppl']:.3f}"
        )
    if lm_tasks is not None:
        from .zeroshot import format_comparison

        say(f"zero-shot (lm-eval, limit {_limit(args.lm_eval_limit)}):")
        say(format_comparison(zs_dense, zs_pruned))
    say(f"total {seconds:.1f}s (load {load_s:.1f}s, prune {report.seconds:.1f}s)")
    if args.report and lead:
        doc = {
            "model": args.model,
            "method": report.method,
            "sparsity": report.sparsity,
            "pattern": report.pattern,
            "nsamples": report.nsamples,
            "seqlen": args.seqlen,
            "calib": args.calib,
            "eval": args.eval,
            "eval_windows": None if dense is None else dense["windows"],
            "device": args.device,
            "seed": args.seed,
            "dtype": args.dtype,
            "torch": torch.__version__,
            "seconds": seconds,
            "load_seconds": load_s,
            "prune_seconds": report.seconds,
            "ppl_dense": None if dense is None else dense["ppl"],
            "ppl_pruned": None if pruned is None else pruned["ppl"],
            "achieved_sparsity": report.achieved_sparsity,
            "block_sparsity": report.block_sparsity,
            "saved": saved,
            "lm_eval": _lm_eval_report(args, lm_tasks, zs_dense, zs_pruned),
            **{
                k: v
                for k, v in report.to_dict().items()
                if k in ("totals", "options", "layers", "dense")
            },
        }
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        say(f"report written to {args.report}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from .models import load_model, resolve_model
    from .zeroshot import format_comparison

    t_start = time.perf_counter()
    if args.lm_eval is None:
        raise ValueError("--lm-eval TASKS is required (e.g. --lm-eval arc_easy,piqa)")
    check_lm_eval_args(args)
    check_device(args.device)
    if args.dtype not in FLOAT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {args.dtype!r}")
    if args.report:
        _check_output(args.report, "--report", directory=False)
    say = print if not args.quiet else (lambda *a, **k: None)
    tasks = _load_lm_eval_tasks(args)
    resolve_model(args.model)
    say(f"loading {args.model} ...", flush=True)
    model, tok = load_model(args.model, dtype=args.dtype)
    res = _run_lm_eval(args, tasks, model, tok, "dense", say)
    say(f"zero-shot (lm-eval, limit {_limit(args.lm_eval_limit)}):")
    say(format_comparison(res, None))
    seconds = time.perf_counter() - t_start
    say(f"total {seconds:.1f}s")
    if args.report:
        doc = {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "seed": args.seed,
            "torch": torch.__version__,
            "seconds": seconds,
            "lm_eval": _lm_eval_report(args, tasks, res),
        }
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        say(f"report written to {args.report}")
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


def _reconstruct_arg(text: str):
    if text not in ("best", "best_rows"):
        raise argparse.ArgumentTypeError(
            f"--reconstruct takes no value, 'best' or 'best_rows', got {text!r}"
        )
    return text


def options_method(args: argparse.Namespace):
    """The `Method` that runs: `args.method`'s entry, composed with --refine/--reconstruct
    for a mask selector."""
    flags = {o: getattr(args, d) for d, o in OPTION_FLAGS.items() if getattr(args, d) is not None}
    return composed(METHODS[args.method], flags)


def method_options(args: argparse.Namespace) -> dict:
    """The options `args.method` gets from the CLI's flags (`OPTION_FLAGS`): those its
    `METHODS` entry (composed with --refine/--reconstruct) declares, where given."""
    declared = options_method(args).options
    return {
        opt: getattr(args, dest)
        for dest, opt in OPTION_FLAGS.items()
        if opt in declared and getattr(args, dest) is not None
    }


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
        "--moe-calibration",
        choices=["routed", "all"],
        default="routed",
        help="MoE experts' Hessians: routed (the tokens the router sends each expert) or all "
        "(every token through every expert; the block's output still follows the router)",
    )
    q.add_argument("--targets", nargs="+", default=None, help="glob patterns of layers to prune")
    q.add_argument("--ignore", nargs="+", default=None, help="glob patterns of layers to skip")
    q.add_argument(
        "--max-swaps",
        type=int,
        default=None,
        help=f"{_for('max_swaps')}: steps per layer (default: a per-layer budget on CPU, "
        "a larger one on GPU; see fastprune.methods)",
    )
    q.add_argument(
        "--reconstruct",
        nargs="?",
        const=True,
        default=None,
        type=_reconstruct_arg,
        metavar="best|best_rows",
        help=f"{_for('reconstruct')}/{'/'.join(SELECTORS)}: OBS reconstruction on the final "
        "mask (--reconstruct best: only where it lowers the layer's loss; best_rows: row by "
        "row)",
    )
    q.add_argument(
        "--refine",
        default=None,
        choices=REFINERS,
        help=f"{'/'.join(SELECTORS)}/fastprune: refine the method's mask by optimal 1-swaps",
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
    q.add_argument("--report", default=None, help="write a JSON report here")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("--quiet", action="store_true", help="print nothing but errors")
    _add_lm_eval_flags(q)
    q.set_defaults(func=_prune)

    e = sub.add_parser(
        "eval",
        help="zero-shot lm-eval tasks on a model (no pruning)",
        description="Run lm-evaluation-harness tasks on a model as loaded by `prune`.",
    )
    e.add_argument("--model", default="smollm2-135m", help="as for `prune`")
    e.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    e.add_argument("--dtype", default="float32", help="model dtype: float32 | bfloat16 | float16")
    e.add_argument("--report", default=None, help="write a JSON report here")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument("--quiet", action="store_true", help="print nothing but errors")
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
        from .launch import PEER_FAILED_EXIT
        from .pipeline.distributed import RankFailedError

        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = f"rank {os.environ.get('RANK', '?')}: " if world > 1 else ""
        print(f"fastprune: error: {rank}{e}", file=sys.stderr)
        return PEER_FAILED_EXIT if isinstance(e, RankFailedError) else 2


if __name__ == "__main__":
    sys.exit(main())
