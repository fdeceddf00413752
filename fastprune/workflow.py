"""The prune and eval workflows as Python calls, which the `fastprune` command parses its flags
into: load a model, calibrate, evaluate the dense model, prune, evaluate the pruned one, save
and verify, report.

    job = PruneJob(model="smollm2-135m", method="fastprune", pattern="2:4", save="out/")
    check_prune_job(job)          # every argument, before anything is loaded
    doc = run_prune(job)          # the report (also written to job.report if given)

A check names the argument it failed on through `name` (the CLI passes its flag names).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .methods import METHODS, composed
from .models import DEFAULT_MODEL
from .pipeline.allocation import OWL_LAMBDA, OWL_THRESHOLD
from .solvers.registry import selectors

FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
# says one line (print-like); `quiet` jobs get a silent one
Say = Callable[..., None]
# the name an error gives an argument: the field's own name, or the CLI's flag
Name = Callable[[str], str]


def field_name(name: str) -> str:
    return name


# fields `prune_model` also has a parameter for that the workflow decides itself (the
# calibration tokens are drawn here; progress bars only on the rank that talks)
_NOT_PASSED = {"model", "seed", "nsamples", "seqlen", "progress"}


@dataclass
class LmEval:
    """Zero-shot lm-eval tasks to run on the dense and the pruned model."""

    tasks: str | list[str]
    limit: float | None = None  # a whole number: examples per task; below 1: a fraction
    batch_size: int = 1
    include: list[str] | None = None  # directories of task YAMLs


@dataclass
class PruneJob:
    """One end-to-end prune. `options` are the method's options (`METHODS[method].options`;
    `refine`/`reconstruct` compose a mask selector with swaps/OBS reconstruction);
    `pattern` "N:M" overrides `sparsity`. `calib` / `eval`: "builtin", a text file,
    "wikitext2" or "c4" (`eval` also "none"). `nproc` > 1 is the CLI's own launcher; from
    Python, run under torchrun instead. `stream`: prune a local safetensors checkpoint block
    by block from disk, writing `save` as it goes (True), in memory (False), or streamed
    only when it would not fit in the free host memory (None)."""

    model: str = DEFAULT_MODEL
    method: str = "rose"
    sparsity: float = 0.5
    pattern: str | None = None
    options: dict = field(default_factory=dict)
    nsamples: int = 32
    seqlen: int = 512
    calib: str = "builtin"
    eval: str = "builtin"
    eval_windows: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 1
    hessian_precision: str = "auto"
    hessian_kind: str = "auto"
    moe_calibration: str = "routed"
    asymmetric: bool = False
    targets: list[str] | None = None
    ignore: list[str] | None = None
    allocation: str = "uniform"
    owl_lambda: float = OWL_LAMBDA
    owl_threshold: float = OWL_THRESHOLD
    nproc: int = 1
    dist_timeout: float | None = None
    save: str | None = None
    report: str | None = None
    lm_eval: LmEval | None = None
    stream: bool | None = None
    seed: int = 0
    progress: bool = True
    quiet: bool = False

    @property
    def prune_n_m(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)

    def method_entry(self):
        """The `Method` that runs: `method`'s entry, composed with refine/reconstruct for a
        mask selector."""
        return composed(METHODS[self.method], self.options)

    def pipeline_arguments(self) -> dict:
        """The fields `prune_model` takes by the same name, and the method's options."""
        from .pipeline import prune_model

        params = inspect.signature(prune_model).parameters.values()
        own = {p.name for p in params if p.kind is not p.VAR_KEYWORD} - _NOT_PASSED
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in own}
        return fields | self.method_options()

    def method_options(self) -> dict:
        """The options of `options` that the method (so composed) declares."""
        declared = self.method_entry().options
        return {k: v for k, v in self.options.items() if k in declared}


@dataclass
class EvalJob:
    """Zero-shot lm-eval tasks on a model as `PruneJob` loads it, without pruning."""

    lm_eval: LmEval
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "float32"
    report: str | None = None
    seed: int = 0
    progress: bool = True
    quiet: bool = False


def parse_pattern(text: str | None, name: str = "pattern") -> tuple[int, int]:
    """'2:4' -> (2, 4); None / 'unstructured' / 'none' / '' -> (0, 0)."""
    if text is None or text.strip().lower() in ("", "none", "unstructured"):
        return 0, 0
    parts = text.split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{name} must look like N:M (e.g. 2:4), got {text!r}") from None
    if not 0 < n < m:
        raise ValueError(f"{name} N:M needs 0 < N < M, got {text!r}")
    return n, m


# ------------------------------------------------------------------------------ checks


def check_source(spec: str, name: str, allowed: tuple[str, ...]) -> None:
    """`spec` is one of `allowed` or a non-empty UTF-8 text file (read once to check)."""
    from .data import read_text_file

    if spec in allowed:
        return
    p = Path(spec).expanduser()
    if not p.is_file():
        raise ValueError(
            f"{name} {spec!r} is neither one of {', '.join(allowed)} nor a readable text file"
        )
    read_text_file(p, name)


def check_output(path: str, name: str, directory: bool) -> None:
    """An output path that can be written: not an existing file (for a directory) or
    directory (for a file), under an existing directory or one that can be created."""
    import os

    p = Path(path).expanduser()
    if directory and p.exists() and not p.is_dir():
        raise ValueError(f"{name} {path!r} exists and is not a directory")
    if not directory and p.is_dir():
        raise ValueError(f"{name} {path!r} is a directory; give a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        if not directory:
            raise ValueError(f"{name} {path!r}: directory {str(p.parent)!r} does not exist")
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{name} {path!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{name} {path!r}: directory {str(parent)!r} is not writable")


def check_device(spec: str, name: str = "device") -> None:
    """`spec` names a device this machine has."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} {spec!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {spec}: CUDA is not available on this machine")


def check_dtype(dtype: str, name: str = "dtype") -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")


def check_lm_eval(spec: LmEval | None, name: Name = field_name) -> None:
    """The lm-eval settings (lm-eval itself is imported only to build the tasks)."""
    if spec is None:
        return
    if spec.limit is not None and spec.limit <= 0:
        raise ValueError(f"{name('lm_eval_limit')} must be > 0, got {spec.limit}")
    if spec.batch_size < 1:
        raise ValueError(f"{name('lm_eval_batch_size')} must be >= 1, got {spec.batch_size}")


def check_prune_job(job: PruneJob, name: Name = field_name) -> tuple[int, int]:
    """Every argument of `job` checked before anything is loaded (the model's config is
    read to check `targets`/`ignore`); returns the N:M pattern. Errors are `ValueError`s
    naming the argument as `name` spells it."""
    from .data import DATASETS
    from .models import check_selection, find_blocks, model_skeleton, resolve_model
    from .pipeline.allocation import check_allocation
    from .pipeline.distributed import dist_timeout
    from .validation import check_sparsity

    if job.method not in METHODS:
        raise ValueError(
            f"{name('method')} must be one of {', '.join(METHODS)}, got {job.method!r}"
        )
    n, m = parse_pattern(job.pattern, name("pattern"))
    check_sparsity(job.sparsity, name("sparsity"))
    for key in ("nsamples", "seqlen", "eval_windows", "batch_size", "nproc"):
        if getattr(job, key) < 1:
            raise ValueError(f"{name(key)} must be >= 1, got {getattr(job, key)}")
    if job.nproc > 1 and job.method_entry().needs_calibration and job.nproc > job.nsamples:
        raise ValueError(
            f"{name('nproc')} {job.nproc} is larger than {name('nsamples')} {job.nsamples}: "
            "every process needs at least one calibration sample"
        )
    dist_timeout(job.dist_timeout, name("dist_timeout"))
    if job.asymmetric and job.nproc > 1:
        raise ValueError(f"{name('asymmetric')} runs in one process, not with {name('nproc')} > 1")
    if job.asymmetric and not job.method_entry().needs_calibration:
        raise ValueError(f"{name('asymmetric')} needs calibration, which {job.method} does not use")
    opts = job.options
    if opts.get("max_swaps") is not None and opts["max_swaps"] < 0:
        raise ValueError(f"{name('max_swaps')} must be >= 0, got {opts['max_swaps']}")
    if opts.get("refit_iters") is not None and opts["refit_iters"] < 0:
        raise ValueError(f"{name('refit_iters')} must be >= 0, got {opts['refit_iters']}")
    takes = (*selectors(), "fastprune")
    for key in ("refine", "refine_on"):
        if opts.get(key) is not None and job.method not in takes:
            raise ValueError(f"{name(key)} applies to method {'/'.join(takes)}, not {job.method}")
    if opts.get("reconstruct") in ("best", "best_rows", "lstsq") and job.method not in takes:
        raise ValueError(
            f"{name('reconstruct')} {opts['reconstruct']} applies to method {'/'.join(takes)}"
        )
    try:
        check_allocation(job.allocation, job.owl_threshold, job.owl_lambda)
    except ValueError as e:
        msg = str(e)
        for key in ("owl_threshold", "owl_lambda", "allocation"):
            msg = msg.replace(key, name(key))
        raise ValueError(msg) from None
    check_dtype(job.dtype, name("dtype"))
    check_device(job.device, name("device"))
    check_source(job.calib, name("calib"), ("builtin", *DATASETS))
    if job.eval != "none":
        check_source(job.eval, name("eval"), ("builtin", "none", *DATASETS))
    if job.save:
        check_output(job.save, name("save"), directory=True)
    if job.report:
        check_output(job.report, name("report"), directory=False)
    check_lm_eval(job.lm_eval, name)
    src = resolve_model(job.model)  # unknown model: fail before the slow part
    if job.stream:
        _check_streamable(job, src, name)
    if job.targets or job.ignore:  # patterns that match nothing: fail before the load too
        check_selection(find_blocks(model_skeleton(job.model))[1], job.targets, job.ignore)
    return n, m


def _check_streamable(job: PruneJob, src, name: Name) -> None:
    """What a streamed prune needs: a local safetensors checkpoint, a save folder outside it,
    a method and allocation that do not need the whole model, no lm-eval tasks."""
    from .streaming import check_output as check_stream_output
    from .streaming import open_checkpoint

    if src.gguf_file or not Path(src.path).is_dir():
        raise ValueError(
            f"{name('stream')}: {job.model} is not a local safetensors checkpoint folder"
        )
    ckpt = open_checkpoint(src.path)
    if not job.save:
        raise ValueError(
            f"{name('stream')} writes the pruned model as it goes: give {name('save')}"
        )
    check_stream_output(job.save, ckpt.path)
    if job.method_entry().needs_gradients:
        raise ValueError(f"{name('stream')}: method {job.method} needs the whole model (gradients)")
    if job.allocation != "uniform":
        raise ValueError(f"{name('stream')}: {name('allocation')} {job.allocation} is not streamed")
    if job.lm_eval is not None:
        raise ValueError(f"{name('stream')}: {name('lm_eval')} needs the whole model in memory")


def check_eval_job(job: EvalJob, name: Name = field_name) -> None:
    """`job`'s arguments checked before anything is loaded."""
    from .models import resolve_model

    check_lm_eval(job.lm_eval, name)
    check_device(job.device, name("device"))
    check_dtype(job.dtype, name("dtype"))
    if job.report:
        check_output(job.report, name("report"), directory=False)
    resolve_model(job.model)


# ------------------------------------------------------------------------------ lm-eval


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


# ------------------------------------------------------------------------------ workflows


def _sayer(quiet: bool, lead: bool = True) -> Say:
    return print if lead and not quiet else (lambda *a, **k: None)


def run_prune(job: PruneJob, name: Name = field_name) -> dict:
    """`job` checked (`check_prune_job`) and run end to end in this process (`run_checked`).
    Returns the report (the JSON written to `job.report`)."""
    check_prune_job(job, name)
    return run_checked(job, name)


def run_checked(job: PruneJob, name: Name = field_name) -> dict:
    """`job`, already checked, end to end in this process: under torchrun (WORLD_SIZE > 1)
    every rank prunes its share and rank 0 alone evaluates, saves and reports."""
    import torch.distributed as dist

    from .pipeline.distributed import init_from_env

    created = init_from_env(job.dist_timeout, job.device)
    try:
        return _prune_here(job, name)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _prune_here(job: PruneJob, name: Name) -> dict:
    import torch

    from .pipeline.distributed import active_world

    t_start = time.perf_counter()
    torch.manual_seed(job.seed)
    # under torchrun every rank prunes; only rank 0 talks, evaluates and writes files
    lead = active_world() == 1 or torch.distributed.get_rank() == 0
    run = _Run(job, name, lead, _sayer(job.quiet, lead), job.progress and lead)
    streamed = streaming_decision(job, run.say)
    out = _prune_streamed(run) if streamed else _prune_in_memory(run)
    return _finish(run, out, time.perf_counter() - t_start)


@dataclass
class _Run:
    """One rank's view of a prune job: whether it talks and writes (`lead`), how it says
    things, whether it shows progress."""

    job: PruneJob
    name: Name
    lead: bool
    say: Say
    progress: bool

    def ppl(self, evaluate, desc: str):
        """`evaluate(desc)` (a perplexity), announced."""
        r = evaluate(desc)
        seqlen = self.job.seqlen
        self.say(f"{desc}: {r['ppl']:.3f} ({r['windows']} windows x {seqlen} tokens)", flush=True)
        return r


def streaming_decision(job: PruneJob, say: Say = print) -> bool:
    """Whether `job` streams its model block by block: as asked (`stream` True/False), else
    when the model is a local safetensors checkpoint that would not fit in the host memory
    that is free (loaded in `job.dtype`)."""
    if job.stream is not None:
        return job.stream
    import torch

    from .models import resolve_model
    from .streaming import open_checkpoint

    src = resolve_model(job.model)
    folder = Path(src.path)
    if src.gguf_file or not folder.is_dir():
        return False
    try:
        ckpt = open_checkpoint(folder)
    except ValueError:
        return False  # not a safetensors checkpoint: transformers loads it (or says why)
    if ckpt.fits_in_memory(dtype=getattr(torch, job.dtype)):
        return False
    say(
        f"{job.model} needs more host memory than is free ({ckpt.nbytes / 2**30:.1f} GiB as "
        "stored): pruning it block by block from the checkpoint (streamed)",
        flush=True,
    )
    if not job.save:
        raise ValueError(
            f"{job.model} does not fit in the host memory that is free, so it is pruned block "
            "by block and written as it goes: give a save folder"
        )
    return True


def _prune_in_memory(run: _Run) -> dict:
    from .data import get_calibration, get_eval_ids
    from .evaluate import perplexity
    from .models import load_model
    from .pipeline import prune_model

    job, say, lead, progress = run.job, run.say, run.lead, run.progress
    n, m = job.prune_n_m
    lm_tasks = load_lm_eval_tasks(job.lm_eval, run.name) if lead else None
    say(f"loading {job.model} ...", flush=True)
    t0 = time.perf_counter()
    model, tok = load_model(job.model, dtype=job.dtype)
    load_s = time.perf_counter() - t0
    calib = None
    if job.method_entry().needs_calibration:
        calib = get_calibration(job.calib, tok, job.nsamples, job.seqlen, job.seed)
    eval_ids = None if job.eval == "none" or not lead else get_eval_ids(job.eval, tok)

    def ppl(desc):
        if eval_ids is None:
            return None
        return run.ppl(
            lambda d: perplexity(
                model, eval_ids, job.seqlen, max_windows=job.eval_windows, device=job.device,
                progress=progress, desc=d,
            ),
            desc,
        )  # fmt: skip

    def zero_shot(label):
        return run_lm_eval(
            job.lm_eval, lm_tasks, model, tok, label, say, job.device, progress, job.seed
        )

    dense, zs_dense = ppl("perplexity dense"), zero_shot("dense")
    report = prune_model(
        model, calib, prune_n=n, prune_m=m, progress=progress, **job.pipeline_arguments()
    )
    pruned, zs_pruned = ppl("perplexity pruned"), zero_shot("pruned")
    saved = None
    if job.save and lead:
        from .saving import save_pruned, verify_saved

        out = save_pruned(model, tok, job.save, report)
        sample = eval_ids[: job.seqlen] if eval_ids is not None else calib[0]
        saved = verify_saved(model, out, report, sample)
        say(
            f"saved to {out} (safetensors + tokenizer); reloaded: sparsity "
            f"{saved['sparsity']:.4f}, max logit difference {saved['max_logit_diff']:g}"
        )
    return {
        "report": report, "dense": dense, "pruned": pruned, "zs": (zs_dense, zs_pruned),
        "lm_tasks": lm_tasks, "saved": saved, "load_seconds": load_s,
    }  # fmt: skip


def _prune_streamed(run: _Run) -> dict:
    import torch

    from .data import get_calibration, get_eval_ids
    from .models import resolve_model
    from .pipeline.stream import prune_checkpoint, streamed_perplexity, verify_streamed_prune
    from .streaming import open_checkpoint

    job, say, lead, progress = run.job, run.say, run.lead, run.progress
    n, m = job.prune_n_m
    ckpt = open_checkpoint(resolve_model(job.model).path)
    say(f"streaming {job.model} ({ckpt}) ...", flush=True)
    tok = _tokenizer_of(ckpt.path)
    calib = None
    if job.method_entry().needs_calibration:
        calib = get_calibration(job.calib, tok, job.nsamples, job.seqlen, job.seed)
    eval_ids = None if job.eval == "none" or not lead else get_eval_ids(job.eval, tok)
    dtype = getattr(torch, job.dtype)

    def ppl(source, desc):
        if eval_ids is None:
            return None
        return run.ppl(
            lambda d: streamed_perplexity(
                source, eval_ids, job.seqlen, max_windows=job.eval_windows, device=job.device,
                dtype=dtype, progress=progress, desc=d,
            ),
            desc,
        )  # fmt: skip

    dense = ppl(ckpt, "perplexity dense")
    report = prune_checkpoint(
        ckpt, job.save, calib, dtype=dtype, tokenizer=tok, prune_n=n, prune_m=m,
        progress=progress, **job.pipeline_arguments(),
    )  # fmt: skip
    saved = None
    if lead:
        saved = verify_streamed_prune(job.save, report)
        say(
            f"saved to {job.save} block by block ({saved['shards']} shards); read back: "
            f"{saved['verified']} tensors as written, sparsity {saved['sparsity']:.4f}"
        )
    pruned = ppl(job.save, "perplexity pruned")
    return {
        "report": report, "dense": dense, "pruned": pruned, "zs": (None, None),
        "lm_tasks": None, "saved": saved, "load_seconds": 0.0,
    }  # fmt: skip


def _tokenizer_of(folder: Path):
    """The checkpoint's tokenizer, or None when it has none (token-id calibration only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None


def _finish(run: _Run, out: dict, seconds: float) -> dict:
    """The summary said and the report (written where asked)."""
    import torch

    job, say = run.job, run.say
    report, dense, pruned = out["report"], out["dense"], out["pruned"]
    zs_dense, zs_pruned = out["zs"]
    say(report.summary())
    if dense is not None:
        say(
            f"perplexity ({job.eval}, {dense['windows']}x{job.seqlen} tokens): "
            f"dense {dense['ppl']:.3f} -> pruned {pruned['ppl']:.3f}"
        )
    if out["lm_tasks"] is not None:
        from .zeroshot import format_comparison

        say(f"zero-shot (lm-eval, limit {lm_eval_limit(job.lm_eval.limit)}):")
        say(format_comparison(zs_dense, zs_pruned))
    say(
        f"total {seconds:.1f}s (load {out['load_seconds']:.1f}s, prune {report.seconds:.1f}s; "
        f"{report.totals['path']}, peak host memory "
        f"{report.totals['peak_host_memory_bytes'] / 2**30:.2f} GiB)"
    )
    totals = {k: v for k, v in report.totals.items() if k != "digests"}
    doc = {
        "model": job.model,
        "method": report.method,
        "sparsity": report.sparsity,
        "pattern": report.pattern,
        "nsamples": report.nsamples,
        "seqlen": job.seqlen,
        "calib": job.calib,
        "eval": job.eval,
        "eval_windows": None if dense is None else dense["windows"],
        "device": job.device,
        "seed": job.seed,
        "dtype": job.dtype,
        "torch": torch.__version__,
        "seconds": seconds,
        "load_seconds": out["load_seconds"],
        "prune_seconds": report.seconds,
        "path": report.totals["path"],
        "peak_host_memory_bytes": report.totals["peak_host_memory_bytes"],
        "ppl_dense": None if dense is None else dense["ppl"],
        "ppl_pruned": None if pruned is None else pruned["ppl"],
        "achieved_sparsity": report.achieved_sparsity,
        "block_sparsity": report.block_sparsity,
        "saved": out["saved"],
        "lm_eval": lm_eval_report(job.lm_eval, out["lm_tasks"], zs_dense, zs_pruned),
        **{k: v for k, v in report.to_dict().items() if k in ("options", "layers", "dense")},
        "totals": totals,
    }
    if job.report and run.lead:
        _write_report(job.report, doc, say)
    return doc


def run_eval(job: EvalJob, name: Name = field_name) -> dict:
    """lm-eval tasks on the model, no pruning; the report (written to `job.report` if
    given)."""
    import torch

    from .models import load_model
    from .zeroshot import format_comparison

    t_start = time.perf_counter()
    check_eval_job(job, name)
    say = _sayer(job.quiet)
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
        _write_report(job.report, doc, say)
    return doc


def _write_report(path: str, doc: dict, say: Say) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    say(f"report written to {path}")
