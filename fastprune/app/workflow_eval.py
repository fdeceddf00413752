"""The eval workflow (`run_eval`: lm-eval tasks on a model, no pruning) and the lm-eval steps
the prune workflow shares with it: the tasks built before the model loads, run, reported."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .workflow_checks import Name, check_eval_job, field_name

if TYPE_CHECKING:
    from .workflow import EvalJob, LmEval

# says one line (print-like); `quiet` jobs get a silent one
Say = Callable[..., None]


def sayer(quiet: bool, lead: bool = True) -> Say:
    return print if lead and not quiet else (lambda *a, **k: None)


def lm_eval_limit(value: float | None):
    """A whole number is a count of examples, below 1 a fraction."""
    return int(value) if value is not None and value >= 1 and value == int(value) else value


def load_lm_eval_tasks(spec: LmEval | None, name: Name = field_name):
    """The tasks, built (datasets fetched) before the model is loaded."""
    if spec is None:
        return None
    from .zeroshot import load_tasks

    return load_tasks(
        spec.tasks, spec.include, arg=name("lm_eval"), include_arg=name("lm_eval_include")
    )


def run_lm_eval(spec, tasks, model, tok, label: str, say: Say, device, progress, seed):
    """The tasks on `model`, timed and announced; None without tasks."""
    if tasks is None:
        return None
    from .zeroshot import lm_eval_tasks

    say(f"lm-eval {label}: {', '.join(tasks.names)} ...", flush=True)
    t0 = time.perf_counter()
    res = lm_eval_tasks(
        model,
        tok,
        tasks,
        limit=lm_eval_limit(spec.limit),
        batch_size=spec.batch_size,
        device=device,
        progress=progress,
        seed=seed,
    )
    say(f"lm-eval {label}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    return res


def lm_eval_report(spec: LmEval | None, tasks, dense, pruned=None) -> dict | None:
    if tasks is None:
        return None
    doc = {
        "tasks": tasks.names,
        "limit": lm_eval_limit(spec.limit),
        "batch_size": spec.batch_size,
        "include": tasks.include,
        "dense": dense,
    }
    if pruned is not None:
        doc["pruned"] = pruned
    return doc


def run_eval(job: EvalJob, name: Name = field_name) -> dict:
    """lm-eval tasks on the model, no pruning; the report (written to `job.report` if
    given)."""
    import torch

    from ..models import load_model
    from .zeroshot import format_comparison

    t_start = time.perf_counter()
    check_eval_job(job, name)
    say = sayer(job.quiet)
    tasks = load_lm_eval_tasks(job.lm_eval, name)
    say(f"loading {job.model} ...", flush=True)
    model, tok = load_model(job.model, dtype=job.dtype)
    res = run_lm_eval(
        job.lm_eval, tasks, model, tok, "dense", say, job.device, job.progress, job.seed
    )
    say(f"zero-shot (lm-eval, limit {lm_eval_limit(job.lm_eval.limit)}):")
    say(format_comparison(res, None))
    seconds = time.perf_counter() - t_start
    say(f"total {seconds:.1f}s")
    doc = {
        "model": job.model,
        "device": job.device,
        "dtype": job.dtype,
        "seed": job.seed,
        "torch": torch.__version__,
        "seconds": seconds,
        "lm_eval": lm_eval_report(job.lm_eval, tasks, res),
    }
    if job.report:
        write_report(job.report, doc, say)
    return doc


def write_report(path: str, doc: dict, say: Say) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    say(f"report written to {path}")
