"""The workflow's checks: every argument of a `PruneJob` / `EvalJob` before anything is
loaded. Pipeline options go through the one check of `fastprune.config` (`check_config`),
the workflow's own through their declared validators; errors name the argument as `name`
spells it (the Python keyword, or the command's flag)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Name, PruneConfig, check_config, check_declared, given, keyword, options
from ..config import check_device as _check_device

if TYPE_CHECKING:
    from .workflow import EvalJob, LmEval, PruneJob

FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
field_name = keyword  # an error names a field by its own name


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


def check_source(spec: str, name: str, allowed: tuple[str, ...]) -> None:
    """`spec` is one of `allowed` or a non-empty UTF-8 text file (read once to check)."""
    from ..data import read_text_file

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
    _check_device(spec, name)


def check_dtype(dtype: str, name: str = "dtype") -> str:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    return dtype


def calib_source(spec: Any, name: str) -> Any:
    from ..data import DATASETS

    check_source(spec, name, ("builtin", *DATASETS))
    return spec


def eval_source(spec: Any, name: str) -> Any:
    from ..data import DATASETS

    if spec != "none":
        check_source(spec, name, ("builtin", "none", *DATASETS))
    return spec


def save_folder(path: Any, name: str) -> Any:
    """A folder the pruned model can be written to: new, or an empty folder (on every path:
    writing beside files already there would mix two models)."""
    if path:
        check_output(path, name, directory=True)
        p = Path(path).expanduser()
        if p.is_dir() and any(p.iterdir()):
            raise ValueError(f"{name} {path!r} exists and is not empty; give a new folder")
    return path


def report_file(path: Any, name: str) -> Any:
    if path:
        check_output(path, name, directory=False)
    return path


def timeout(seconds: Any, name: str) -> Any:
    from ..pipeline.distributed import dist_timeout

    dist_timeout(seconds, name)
    return seconds


def check_lm_eval(spec: LmEval | None, name: Name = field_name) -> None:
    """The lm-eval settings (lm-eval itself is imported only to build the tasks)."""
    if spec is None:
        return
    if spec.limit is not None and spec.limit <= 0:
        raise ValueError(f"{name('lm_eval_limit')} must be > 0, got {spec.limit}")
    if spec.batch_size < 1:
        raise ValueError(f"{name('lm_eval_batch_size')} must be >= 1, got {spec.batch_size}")


def check_method_flags(job: PruneJob, name: Name) -> None:
    """A job's method options reach every method that declares them (the command's flags):
    their values are checked whichever method runs, and refine/refine_on/reconstruct with a
    mask choice are refused for a method that cannot compose them."""
    from ..config import METHOD_FLAG_OF
    from ..methods import METHODS, composed

    opts = job.options
    for key, value in opts.items():
        if key in METHOD_FLAG_OF:
            METHOD_FLAG_OF[key].check(value, name(key))
    takes = [k for k, m in METHODS.items() if "refine" in composed(m, {"refine": None}).options]
    if job.method in takes or job.method not in METHODS:  # not a method: check_config says so
        return
    for key in ("refine", "refine_on"):
        if opts.get(key) is not None:
            raise ValueError(f"{name(key)} applies to method {'/'.join(takes)}, not {job.method}")
    if isinstance(opts.get("reconstruct"), str):
        raise ValueError(
            f"{given(name, 'reconstruct', opts['reconstruct'])} applies to method {'/'.join(takes)}"
        )


def check_prune_job(job: PruneJob, name: Name = field_name) -> tuple[int, int]:
    """Every argument of `job` checked before anything is loaded (the model's config is
    read to check `targets`/`ignore`); returns the N:M pattern. Errors are `ValueError`s
    naming the argument as `name` spells it."""
    from ..models import find_blocks, model_skeleton, resolve_model
    from ..pipeline.block_layers import check_selection

    n, m = parse_pattern(job.pattern, name("pattern"))
    check_method_flags(job, name)
    checked = check_config(job.config(), name)
    check_declared(job, name, skip=options(PruneConfig))
    meth = checked.method
    if job.nproc > 1 and meth.needs_calibration and job.nproc > job.nsamples:
        raise ValueError(
            f"{name('nproc')} {job.nproc} is larger than {name('nsamples')} {job.nsamples}: "
            "every process needs at least one calibration sample"
        )
    if job.asymmetric and job.nproc > 1:
        raise ValueError(f"{name('asymmetric')} runs in one process, not with {name('nproc')} > 1")
    check_lm_eval(job.lm_eval, name)
    src = resolve_model(job.model)  # unknown model: fail before the slow part
    if job.stream:
        _check_streamable(job, src, meth, name)
    if checked.quant is not None and job.save:
        _check_quant_save(job, checked.quant, name)
    if job.targets or job.ignore:  # patterns that match nothing: fail before the load too
        check_selection(find_blocks(model_skeleton(job.model))[1], job.targets, job.ignore)
    return n, m


def _check_streamable(job: PruneJob, src, meth, name: Name) -> None:
    """What a streamed prune needs: a local safetensors checkpoint, a save folder outside it,
    a method and allocation that do not need the whole model, no lm-eval tasks."""
    from ..streaming import check_output as check_stream_output
    from ..streaming import open_checkpoint

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
    if meth.needs_gradients:
        raise ValueError(f"{name('stream')}: method {job.method} needs the whole model (gradients)")
    if job.allocation != "uniform":
        raise ValueError(f"{name('stream')}: {name('allocation')} {job.allocation} is not streamed")
    if job.lm_eval is not None:
        raise ValueError(f"{name('stream')}: {name('lm_eval')} needs the whole model in memory")


def _check_quant_save(job: PruneJob, spec, name: Name) -> None:
    """A quantized save, before the prune: the compressed-tensors package is installed, every
    MoE expert to quantize can be saved, and the group size divides every layer that will be
    quantized (read from the model's config)."""
    from ..layers import ExpertProjection, get_weight
    from ..models import find_blocks, model_skeleton
    from ..pipeline.block_layers import find_block_layers
    from .quantized_checkpoint import group_error, missing_package
    from .quantized_experts import dense_error, dense_experts, savable_problem

    reason = missing_package()
    if reason:
        raise ValueError(f"{name('save')} with {name('quant')}: {reason}")
    path, blocks = find_blocks(model_skeleton(job.model), job.blocks)
    layouts = [
        (f"{path}.{i}", find_block_layers(block, job.targets, job.ignore, f"{path}.{i}"))
        for i, block in enumerate(blocks)
    ]
    for (where, layout), block in zip(layouts, blocks):
        problems = [dense_error(p) for p in dense_experts(block, layout.layers, where)]
        for key, layer in layout.layers.items():
            if isinstance(layer, ExpertProjection):
                problems.append(savable_problem(spec, layer.transposed, f"{where}.{key}"))
        problem = next((p for p in problems if p), None)
        if problem:
            raise ValueError(f"{name('save')} with {name('quant')}: {problem}")
    gs = spec.group_size
    if spec.fp8 or gs is None:
        return
    if spec.actorder:
        raise ValueError(
            f"{name('actorder')} with groups ({name('group_size')} {gs}) and {name('save')}: "
            "act-order groups are not contiguous columns, which the compressed-tensors format "
            "no longer loads; use act-order per channel, or no act-order, to save"
        )
    for where, layout in layouts:
        for key, layer in layout.layers.items():
            cols = get_weight(layer).shape[-1]
            if cols % gs:
                raise ValueError(
                    f"{name('group_size')} {gs} with {name('save')}: "
                    + group_error(f"{where}.{key}", cols, gs)
                )


def check_eval_job(job: EvalJob, name: Name = field_name) -> None:
    """`job`'s arguments checked before anything is loaded."""
    from ..models import resolve_model

    check_lm_eval(job.lm_eval, name)
    check_declared(job, name)
    resolve_model(job.model)
