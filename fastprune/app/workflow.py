"""The prune and eval workflows as Python calls, which the `fastprune` command parses its flags
into: load a model, calibrate, evaluate the dense model, prune, evaluate the pruned one, save
and verify, report.

    job = PruneJob(model="smollm2-135m", method="fastprune", pattern="2:4", save="out/")
    check_prune_job(job)          # every argument, before anything is loaded
    doc = run_prune(job)          # the report (also written to job.report if given)

`PruneJob`'s pipeline options are `fastprune.config.PruneConfig`'s (with the command's
defaults); its own fields are declared below the same way. A check names the argument it
failed on through `name` (the command passes its flag names). The checks live in
`workflow_checks`, the prune run in `workflow_run`, the eval run in `workflow_eval`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..config import PruneConfig, flag_bool, integer, job_fields, option, optional, reuse
from ..methods import METHODS, composed
from ..models import DEFAULT_MODEL
from .workflow_checks import (
    FLOAT_DTYPES,
    Name,
    calib_source,
    check_device,
    check_dtype,
    check_eval_job,
    check_lm_eval,
    check_output,
    check_prune_job,
    check_source,
    eval_source,
    field_name,
    parse_pattern,
    report_file,
    save_folder,
    timeout,
)
from .workflow_eval import (
    Say,
    lm_eval_limit,
    lm_eval_report,
    load_lm_eval_tasks,
    run_eval,
    run_lm_eval,
)
from .workflow_run import run_checked, streaming_decision

__all__ = [
    "FLOAT_DTYPES",
    "EvalJob",
    "LmEval",
    "Name",
    "PruneJob",
    "Say",
    "check_device",
    "check_dtype",
    "check_eval_job",
    "check_lm_eval",
    "check_output",
    "check_prune_job",
    "check_source",
    "field_name",
    "job_for",
    "lm_eval_limit",
    "lm_eval_report",
    "load_lm_eval_tasks",
    "parse_pattern",
    "run_checked",
    "run_eval",
    "run_lm_eval",
    "run_prune",
    "streaming_decision",
]


@dataclass
class LmEval:
    """Zero-shot lm-eval tasks to run on the dense and the pruned model."""

    tasks: str | list[str]
    limit: float | None = None  # a whole number: examples per task; below 1: a fraction
    batch_size: int = 1
    include: list[str] | None = None  # directories of task YAMLs


# the pipeline options a job carries, generated from `PruneConfig` with the command's defaults
PipelineOptions = dataclasses.make_dataclass("PipelineOptions", job_fields(PruneConfig))


@dataclass
class PruneJob(PipelineOptions):
    """One end-to-end prune: `PruneConfig`'s options (see docs/options.md; `options` are the
    method's, reaching it where it declares them; `refine`/`reconstruct` compose a mask
    selector with swaps/OBS reconstruction) and the workflow's own. `pattern` "N:M"
    overrides `sparsity`. `calib` / `eval`: "builtin", a text file, "wikitext2" or "c4"
    (`eval` also "none"). `nproc` > 1 is the CLI's own launcher; from Python, run under
    torchrun instead. `stream`: prune a local safetensors checkpoint block by block from
    disk, writing `save` as it goes (True), in memory (False), or streamed only when it
    would not fit in the free host memory (None)."""

    model: str = option(
        DEFAULT_MODEL,
        "smollm2-135m (built in), a local HF model directory, a .gguf, or a hub id",
    )
    pattern: str | None = option(None, "N:M pattern such as 2:4 (overrides --sparsity)")
    calib: str = option("builtin", "builtin | FILE | wikitext2 | c4", check=calib_source)
    eval: str = option("builtin", "builtin | FILE | wikitext2 | c4 | none", check=eval_source)
    eval_windows: int = option(
        16, "at most this many eval windows of --seqlen tokens (default 16)", check=integer(1)
    )
    dtype: str = option("float32", "model dtype: float32 | bfloat16 | float16", check=check_dtype)
    nproc: int = option(
        1,
        "prune with N local processes (torch.distributed: gloo on CPU, NCCL with one GPU "
        "each for --device cuda when there are >= N GPUs); each calibrates on its share of "
        "the samples and solves its share of the layers. 1: this process only",
        check=integer(1),
    )
    dist_timeout: float | None = option(
        None,
        "several processes (--nproc or torchrun): how long a process waits for the others "
        "at a synchronisation point before failing (default $FASTPRUNE_DIST_TIMEOUT or 1800; "
        "it covers rank 0's dense evaluation before pruning)",
        check=timeout, cli={"type": float, "metavar": "SECONDS"},
    )  # fmt: skip
    save: str | None = option(None, "save the pruned model (safetensors) here", check=save_folder)
    report: str | None = option(None, "write a JSON report here", check=report_file)
    lm_eval: LmEval | None = option(
        None,
        "zero-shot lm-eval tasks on the dense and the pruned model (`LmEval`; the command: "
        "--lm-eval TASKS, --lm-eval-limit, --lm-eval-batch-size, --lm-eval-include)",
        argument=False,
    )
    stream: bool | None = option(
        None,
        "prune a local safetensors checkpoint block by block from disk, writing save as it "
        "goes (True), load it whole (False), or stream only when it would not fit in the "
        "free host memory (None)",
        check=optional(flag_bool), flag="--stream", argument=False,
    )  # fmt: skip
    quiet: bool = option(
        False, "print nothing but errors", check=flag_bool, cli={"action": "store_true"}
    )
    config_class: ClassVar[type] = PruneConfig

    @property
    def prune_n_m(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)

    def method_entry(self):
        """The `Method` that runs: `method`'s entry, composed with refine/reconstruct for a
        mask selector."""
        return composed(METHODS[self.method], self.options)

    def method_options(self) -> dict:
        """The options of `options` that the method (so composed) declares (all of them
        for a method that is not one, which the configuration's check refuses)."""
        if self.method not in METHODS:
            return dict(self.options)
        declared = self.method_entry().options
        return {k: v for k, v in self.options.items() if k in declared}

    def config(self) -> PruneConfig:
        """The job's `PruneConfig`: its pipeline options, the pattern as prune_n/prune_m and
        the method options the method declares."""
        n, m = self.prune_n_m
        own = {k: getattr(self, k) for k, _, _ in job_fields(self.config_class)}
        own |= {"prune_n": n, "prune_m": m, "options": self.method_options()}
        return self.config_class(**own)


def job_for(config: type) -> type:
    """`PruneJob` for a configuration class that extends `PruneConfig` (`config.extend`):
    its further options become fields too."""
    known = {k for k, _, _ in job_fields(PruneConfig)}
    extra = [f for f in job_fields(config) if f[0] not in known]
    return dataclasses.make_dataclass(
        "PruneJob", extra, bases=(PruneJob,), namespace={"config_class": config}
    )


@dataclass
class EvalJob:
    """Zero-shot lm-eval tasks on a model as `PruneJob` loads it, without pruning."""

    lm_eval: LmEval
    model: str = reuse(PruneJob, "model")
    device: str = reuse(PruneConfig, "device")
    dtype: str = reuse(PruneJob, "dtype")
    report: str | None = reuse(PruneJob, "report")
    seed: int = reuse(PruneConfig, "seed")
    progress: bool = reuse(PruneConfig, "progress")
    quiet: bool = reuse(PruneJob, "quiet")


def run_prune(job: PruneJob, name: Name = field_name) -> dict:
    """`job` checked (`check_prune_job`) and run end to end in this process (`run_checked`).
    Returns the report (the JSON written to `job.report`)."""
    check_prune_job(job, name)
    return run_checked(job, name)
