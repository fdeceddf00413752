"""docs/options.md, made from the declarations (`options_markdown`)."""

from __future__ import annotations

from typing import Any

from .declare import SAME, options
from .method_flags import METHOD_FLAGS
from .prune_config import PruneConfig


def _cell(value: Any) -> str:
    return "`" + repr(value).replace("|", "\\|") + "`"


def _words(text_value: str) -> str:
    return " ".join(text_value.split()).replace("|", "\\|")


def options_markdown(cls: type = PruneConfig, job: type | None = None) -> str:
    """docs/options.md: the table of `cls`'s options, of the method options' flags and (with
    `job`, e.g. `workflow.PruneJob`) of the job's own options."""
    lines = [
        "# Options",
        "",
        "Generated from `fastprune.config` (`options_markdown()`; regenerate with",
        '`python -c "from fastprune import config; from fastprune.app import workflow; '
        "config.write_options_doc('docs/options.md', workflow.PruneJob)\"`).",
        "Each option is a field of `PruneConfig`, a keyword of `prune_model` /",
        "`prune_checkpoint`, a field of `fastprune.app.workflow.PruneJob` and, where it has one,",
        "a flag of `fastprune prune`. `agreed`: every rank of a distributed prune must be",
        "given the same value.",
        "",
        "| option | flag | type | default | default of the command and PruneJob, where it "
        "differs | agreed | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, opt in options(cls).items():
        flag = opt.flag_name or "(Python only)"
        cmd = "" if opt.job_default is SAME else _cell(opt.job_default)
        lines.append(
            f"| `{key}` | `{flag}` | `{_words(opt.type)}` | {_cell(opt.default)} | {cmd} | "
            f"{'yes' if opt.agreed else ''} | {_words(opt.text)} |"
        )
    lines += [
        "",
        "## Method options on the command line",
        "",
        "A method's own options (`Method.options`) are keywords of `prune_model` too. These",
        "flags set one of them for every method that declares it; unset, each keeps its",
        "default.",
        "",
        "| option | flag | meaning |",
        "|---|---|---|",
    ]
    for f in METHOD_FLAGS:
        lines.append(f"| `{f.option}` | `{f.flag_name}` | {_words(f.help())} |")
    if job is not None:
        lines += [
            "",
            "## The workflow's own options",
            "",
            f"Fields of `{job.__module__}.{job.__name__}` and flags of `fastprune prune` that",
            "are not options of `prune_model`.",
            "",
            "| option | flag | type | default | meaning |",
            "|---|---|---|---|---|",
        ]
        for key, opt in options(job).items():
            if key not in options(cls):
                lines.append(
                    f"| `{key}` | `{opt.flag_name}` | `{_words(opt.type)}` | "
                    f"{_cell(opt.default)} | {_words(opt.text)} |"
                )
    return "\n".join(lines) + "\n"


def write_options_doc(path: str, job: type | None = None) -> None:
    """Write `options_markdown(PruneConfig, job)` to `path` (docs/options.md)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(options_markdown(PruneConfig, job))
