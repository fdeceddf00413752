"""The prune workflow in this process (`run_checked`): load (or stream) the model, calibrate,
evaluate the dense model, prune, evaluate the pruned one, save and verify, report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .workflow_checks import Name, field_name
from .workflow_eval import (
    Say,
    lm_eval_limit,
    lm_eval_report,
    load_lm_eval_tasks,
    run_lm_eval,
    sayer,
    write_report,
)

if TYPE_CHECKING:
    from .workflow import PruneJob


def run_checked(job: PruneJob, name: Name = field_name) -> dict:
    """`job`, already checked, end to end in this process: under torchrun (WORLD_SIZE > 1)
    every rank prunes its share and rank 0 alone evaluates, saves and reports."""
    import torch.distributed as dist

    from ..pipeline.distributed import init_from_env

    created = init_from_env(job.dist_timeout, job.device)
    try:
        return _prune_here(job, name)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _prune_here(job: PruneJob, name: Name) -> dict:
    import torch

    from ..pipeline.distributed import active_world

    t_start = time.perf_counter()
    torch.manual_seed(job.seed)
    # under torchrun every rank prunes; only rank 0 talks, evaluates and writes files
    lead = active_world() == 1 or torch.distributed.get_rank() == 0
    run = _Run(job, name, lead, sayer(job.quiet, lead), job.progress and lead)
    if job.save and lead:
        _mention_stale_partials(job.save, run.say)
    streamed = streaming_decision(job, run.say)
    out = _prune_streamed(run) if streamed else _prune_in_memory(run)
    return _finish(run, out, time.perf_counter() - t_start)


def _mention_stale_partials(save: str, say: Say) -> None:
    """Say which folders earlier, unfinished writes of `save` left beside it, and how to
    remove them (they are never removed without being asked)."""
    from ..streaming.writer import stale_partials

    stale = stale_partials(save)
    if stale:
        names = " ".join(repr(str(p)) for p in stale)
        say(
            f"note: {len(stale)} unfinished folder(s) from earlier writes of {save!r} lie "
            f"beside it (each has a PARTIAL file saying why); remove them with: rm -r {names}"
        )


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

    from ..models import resolve_model
    from ..streaming import open_checkpoint

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
    from ..data import get_calibration, get_eval_ids
    from ..evaluate import perplexity
    from ..models import load_model
    from ..pipeline import prune_model

    job, say, lead, progress = run.job, run.say, run.lead, run.progress
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
    report = prune_model(model, calib, job.config(), progress=progress)
    pruned, zs_pruned = ppl("perplexity pruned"), zero_shot("pruned")
    saved = None
    if job.save and lead:
        from .saving import save_pruned, verify_saved

        out = save_pruned(model, tok, job.save, report)
        sample = eval_ids[: job.seqlen] if eval_ids is not None else calib[0]
        saved = verify_saved(model, out, report, sample)
        saved["bytes"] = report.totals["checkpoint_bytes"]
        kind = "safetensors"
        if report.quantized:
            kind = "compressed-tensors " + report.totals["checkpoint"]["format"]
        say(
            f"saved to {out} ({kind} + tokenizer, {saved['bytes'] / 2**20:.1f} MiB of "
            f"weights); reloaded: sparsity {saved['sparsity']:.4f}, max logit difference "
            f"{saved['max_logit_diff']:g}"
        )
    return {
        "report": report, "dense": dense, "pruned": pruned, "zs": (zs_dense, zs_pruned),
        "lm_tasks": lm_tasks, "saved": saved, "load_seconds": load_s,
    }  # fmt: skip


def _prune_streamed(run: _Run) -> dict:
    import torch

    from ..data import get_calibration, get_eval_ids
    from ..models import resolve_model
    from ..pipeline.stream import prune_checkpoint, streamed_perplexity, verify_streamed_prune
    from ..streaming import open_checkpoint

    job, say, lead, progress = run.job, run.say, run.lead, run.progress
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
        ckpt, job.save, calib, job.config(), dtype=dtype, tokenizer=tok, progress=progress
    )
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
        "quant": report.totals.get("quant"),
        "saved": out["saved"],
        "lm_eval": lm_eval_report(job.lm_eval, out["lm_tasks"], zs_dense, zs_pruned),
        **{k: v for k, v in report.to_dict().items() if k in ("options", "layers", "dense")},
        "totals": totals,
    }
    if job.report and run.lead:
        write_report(job.report, doc, say)
    return doc
