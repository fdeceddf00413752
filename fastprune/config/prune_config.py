"""`PruneConfig`: every option of a prune, declared once, with its one check
(`check_config`) and the building of a configuration from keywords (`make_config`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..hessian import HESSIAN_KINDS, HESSIAN_PRECISIONS
from ..validation import check_pattern, check_sparsity
from .declare import Name, given, keyword, option, options
from .method_flags import METHOD_FLAG_OF
from .quant_options import QUANT_PRESETS, check_quant, integer_in, quant_spec
from .validators import (
    MOE_CALIBRATIONS,
    check_device,
    check_method,
    check_moe_calibration,
    flag_bool,
    integer,
    method_names,
    number_in,
    one_of,
    optional,
    patterns,
    text,
)

if TYPE_CHECKING:
    import torch

    from ..quant import QuantSpec

logger = logging.getLogger("fastprune")

ALLOCATIONS = ("uniform", "owl")
OWL_THRESHOLD = 5.0  # OWL's M: an outlier scores above M x its block's mean
OWL_LAMBDA = 0.08  # OWL's lambda: block sparsities lie within sparsity +- lambda
# prune_model's positional order before the configuration took its place
LEGACY_ORDER = ("method", "sparsity", "prune_n", "prune_m", "device")


# ------------------------------------------------------------------------------ the config


@dataclass(frozen=True)
class PruneConfig:
    """The options of one prune (`prune_model`, `prune_checkpoint`, `fastprune prune`);
    `options` are the method's own (`METHODS[method].options`, with refine/reconstruct for a
    mask selector)."""

    method: str = option("rose", method_names, check=check_method, agreed=True)
    sparsity: float = option(
        0.5, "unstructured sparsity in [0, 1)", check=check_sparsity,
        agreed=True,
    )  # fmt: skip
    prune_n: int = option(
        0, "N of an N:M pattern: N pruned in every M consecutive inputs (0: unstructured)",
        check=integer(0), flag="--pattern", argument=False, agreed=True, in_job=False,
    )  # fmt: skip
    prune_m: int = option(
        0, "M of an N:M pattern", check=integer(0), flag="--pattern", argument=False,
        agreed=True, in_job=False,
    )  # fmt: skip
    device: str | torch.device | None = option(
        None, "where blocks run: cpu | cuda | cuda:N (prune_model: the model's device)",
        check=check_device, job_default="cpu",
    )  # fmt: skip
    nsamples: int = option(
        128, "calibration samples", check=integer(1), job_default=32, cli={"type": int}
    )
    seqlen: int = option(
        2048, "tokens per sample / eval window", check=integer(1), job_default=512,
        cli={"type": int},
    )  # fmt: skip
    seed: int = option(0, "seed of the calibration sampling", check=integer(), agreed=True)
    batch_size: int = option(1, "calibration samples per forward", check=integer(1), agreed=True)
    hessian_precision: str = option(
        "auto",
        "auto: tensor cores (float32 accumulation) for half-precision models on a GPU, else "
        "the reference's float32 arithmetic; exact: always the reference's; fast: the fast "
        "arithmetic for any half-precision model, on CPU too (see fastprune.hessian)",
        check=one_of(HESSIAN_PRECISIONS), cli={"choices": HESSIAN_PRECISIONS}, agreed=True,
    )  # fmt: skip
    hessian_kind: str = option(
        "auto",
        "what is accumulated per layer input: the full H, or its diagonal alone (for a "
        "method that reads nothing else, its Method's reads_diagonal: no GEMM, cols floats; "
        "its layers then report no loss); auto: the diagonal where the method reads no more, "
        "the full H otherwise",
        check=one_of(HESSIAN_KINDS), cli={"choices": HESSIAN_KINDS}, agreed=True,
    )  # fmt: skip
    moe_calibration: str = option(
        "routed",
        "MoE experts' Hessians: routed (the tokens the router sends each expert, normalised "
        "by their count) or all (every token through every expert; the block's output still "
        "follows the router); an expert no token reaches is pruned with H = I, with a warning",
        check=check_moe_calibration, cli={"choices": MOE_CALIBRATIONS}, agreed=True,
    )  # fmt: skip
    asymmetric: bool = option(
        False,
        "fit each layer to the dense model's outputs from the pruned model's inputs "
        "(GPTAQ-style asymmetric calibration: a weight correction W (C - H) H^-1 before the "
        "method prunes, see fastprune.pipeline.asymmetric; dense models, one process, a "
        "method with calibration and the full H; twice the calibration forwards and "
        "activations)",
        check=flag_bool, cli={"action": "store_true"}, agreed=True,
    )  # fmt: skip
    targets: str | list[str] | None = option(
        None,
        "glob patterns of layer names inside a block to prune (self_attn.*, q_proj, "
        "mlp.experts.down_proj); the report lists what stayed dense and why",
        check=patterns, cli={"nargs": "+"},
        agreed=True,
    )  # fmt: skip
    ignore: str | list[str] | None = option(
        None, "glob patterns of layers to skip", check=patterns, cli={"nargs": "+"},
        agreed=True,
    )  # fmt: skip
    blocks: str | None = option(
        None, "module path of the decoder block list, when auto-detection is not wanted",
        check=optional(text), flag=None,
    )  # fmt: skip
    offload_activations: bool | None = option(
        None, "calibration activations on CPU (True), on device (False), or by free memory",
        check=optional(flag_bool), flag=None,
    )  # fmt: skip
    allocation: str = option(
        "uniform",
        "layer-wise sparsity: uniform, or owl (outlier-weighted per block, same total; N:M "
        "stays uniform)",
        check=one_of(ALLOCATIONS), cli={"choices": ALLOCATIONS}, agreed=True,
    )  # fmt: skip
    owl_threshold: float = option(
        OWL_THRESHOLD,
        f"owl: an outlier scores above this x its block's mean (default {OWL_THRESHOLD})",
        check=number_in(0.0, math.inf), agreed=True,
    )  # fmt: skip
    owl_lambda: float = option(
        OWL_LAMBDA, f"owl: block sparsities within sparsity +- this (default {OWL_LAMBDA})",
        check=number_in(0.0, 0.5), agreed=True,
    )  # fmt: skip
    quant: str | QuantSpec | None = option(
        None,
        "round the kept weights to a grid in the same OBS sweep that prunes them (GPTQ's "
        "step; sparsity 0 quantizes alone): w4a16 (int4, groups of 128, symmetric), w8a16 "
        "(int8 per output channel, symmetric) or fp8 (float8 e4m3 per output channel); "
        "--bits/--group-size/--sym/--asym/--actorder change the preset; only methods whose "
        "Method takes quant (from Python also a fastprune.quant.QuantSpec)",
        check=optional(check_quant), cli={"choices": QUANT_PRESETS}, agreed=True,
    )  # fmt: skip
    bits: int | None = option(
        None, "quant: bits of the integer grid, 2..8 (default: the preset's)",
        check=optional(integer_in(2, 8)), cli={"type": int}, agreed=True,
    )  # fmt: skip
    group_size: int | None = option(
        None, "quant: input columns per grid, a positive int (default: the preset's)",
        check=optional(integer(1)), cli={"type": int}, agreed=True,
    )  # fmt: skip
    sym: bool | None = option(
        None, "quant: a symmetric (--sym) or asymmetric (--asym) integer grid (default: the "
        "preset's, symmetric)",
        check=optional(flag_bool), flag="--sym", argument=False, agreed=True,
    )  # fmt: skip
    actorder: bool = option(
        False, "quant: sweep the columns by decreasing diag(H) (GPTQ's act-order)",
        check=flag_bool, cli={"action": "store_true"}, agreed=True,
    )  # fmt: skip
    progress: bool = option(
        True,
        "show progress bars",
        flag="--no-progress",
        cli={"action": "store_false", "help": "no progress bars"},
    )
    options: Mapping[str, Any] = option(
        help="the method's own options (see METHOD_FLAGS for those the command offers)",
        factory=dict, flag=None,
    )  # fmt: skip


def flag_of(name: str, *classes: type) -> str:
    """The flag that sets option `name` (of `classes`, `PruneConfig` and `METHOD_FLAGS`)."""
    for cls in (*classes, PruneConfig):
        opt = options(cls).get(name)
        if opt is not None and opt.flag_name is not None:
            return opt.flag_name
    if name in METHOD_FLAG_OF:
        return METHOD_FLAG_OF[name].flag_name
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class Checked:
    """A configuration checked and resolved: `config` (values normalised, `hessian_kind`
    and `allocation` resolved for the method and pattern), the `Method` that runs (composed
    with refine/reconstruct where asked), its full options, and `quant`: the grid the
    `quant` options make (a `fastprune.quant.QuantSpec`), or None."""

    config: PruneConfig
    method: Any
    options: dict
    quant: QuantSpec | None = None


def check_method_options(method: str, options: Mapping[str, Any], name: Name = keyword):
    """The `Method` that runs and its options (defaults filled in): values of the options
    the command line offers checked as `name` spells them, then the method's own check
    (`TypeError` for an option it does not take)."""
    from ..methods import composed, get_method

    given_options = dict(options)
    for key, value in given_options.items():
        if key in METHOD_FLAG_OF:
            given_options[key] = METHOD_FLAG_OF[key].check(value, name(key))
    meth = composed(get_method(method), given_options)
    return meth, meth.check_options(given_options)


def check_config(config: PruneConfig, name: Name = keyword) -> Checked:
    """Every option of `config` checked once, errors naming it as `name` spells it; the
    relations between options (pattern, allocation, asymmetric, hessian_kind, quant vs.
    method) checked and resolved; `Checked.quant` the grid (a `QuantSpec`) or None."""
    values = {}
    for key, opt in options(type(config)).items():
        value = getattr(config, key)
        values[key] = value if opt.check is None else opt.check(value, name(key))
    meth, opts = check_method_options(values["method"], values["options"], name)
    n, m = check_pattern(values["prune_n"], values["prune_m"], values["prune_m"] or 1)
    method = values["method"]
    if not meth.prunes and (values["sparsity"] or n):
        what = name("prune_n") if n else name("sparsity")
        raise ValueError(
            f"{given(name, 'method', method)} quantizes without pruning: {what} must be 0 "
            "(to prune and quantize in one sweep, use an OBS method with quant)"
        )
    allocation = values["allocation"]
    if allocation == "owl" and n:
        logger.info("allocation='owl' keeps N:M patterns uniform (every layer %d:%d)", n, m)
        allocation = "uniform"
    if allocation == "owl" and not meth.needs_calibration:
        raise ValueError(
            f"{given(name, 'allocation', 'owl')} needs calibration data, which {method!r} does "
            "not use"
        )
    kind = values["hessian_kind"]
    if values["asymmetric"]:
        if not meth.needs_calibration:
            raise ValueError(
                f"{given(name, 'asymmetric', True)} needs calibration data, which {method!r} "
                "does not use"
            )
        if kind == "diagonal":
            raise ValueError(
                f"{given(name, 'asymmetric', True)} needs the full H; "
                f"{given(name, 'hessian_kind', 'diagonal')} keeps none"
            )
        if opts.get("keep_zeros"):  # the corrected weights it quantizes have no zeros to keep
            raise ValueError(
                f"{given(name, 'asymmetric', True)} quantizes corrected weights, whose zeros "
                f"are not the model's: it cannot keep them ({name('keep_zeros')})"
            )
        kind = "full"
    elif kind == "auto":
        kind = "diagonal" if meth.reads_diagonal else "full"
    elif kind == "diagonal" and not meth.reads_diagonal:
        from ..methods import methods_where

        raise ValueError(
            f"{given(name, 'hessian_kind', 'diagonal')} does not fit {meth.name!r}, which "
            f"needs the full H (only {', '.join(methods_where('reads_diagonal'))} read diag(H) "
            "alone)"
        )
    values.update(prune_n=n, prune_m=m, allocation=allocation, hessian_kind=kind)
    spec = quant_spec(values, meth, name)
    return Checked(dataclasses.replace(config, **values), meth, opts, spec)


def agreed(config: PruneConfig) -> dict[str, Any]:
    """The options every rank of a distributed prune must be given alike, by name."""
    return {k: getattr(config, k) for k, opt in options(type(config)).items() if opt.agreed}


# ------------------------------------------------------------------------------ building


def make_config(
    config: Any = None, positional: tuple = (), overrides: Mapping[str, Any] | None = None,
    caller: str = "prune_model",
) -> PruneConfig:  # fmt: skip
    """A `PruneConfig` from `config` (None: the defaults) updated with `overrides`: those
    that are options of the config, and the rest as method options. `config` may also be
    the first of the pipeline options given by position (the former order `method,
    sparsity, prune_n, prune_m, device`, deprecated)."""
    import warnings

    overrides = dict(overrides or {})
    if config is not None and not isinstance(config, PruneConfig):
        positional, config = (config, *positional), None
    elif positional:
        raise TypeError(f"{caller} takes model, calibration and config by position, no more")
    if positional:
        if len(positional) > len(LEGACY_ORDER):
            raise TypeError(f"{caller} takes at most {2 + len(LEGACY_ORDER)} positional arguments")
        names = LEGACY_ORDER[: len(positional)]
        twice = [k for k in names if k in overrides]
        if twice:
            raise TypeError(f"{caller} got multiple values for {twice[0]!r}")
        warnings.warn(
            f"{caller}(model, calibration, {', '.join(map(repr, positional))}): pipeline "
            f"options by position are deprecated; pass them by keyword "
            f"({', '.join(k + '=' for k in names)}) or as a PruneConfig",
            DeprecationWarning,
            stacklevel=3,
        )
        overrides.update(zip(names, positional))
    config = PruneConfig() if config is None else config
    own = options(type(config))
    fields = {k: v for k, v in overrides.items() if k in own and k != "options"}
    method_options = dict(config.options) | dict(overrides.get("options") or {})
    method_options |= {k: v for k, v in overrides.items() if k not in own}
    return dataclasses.replace(config, **fields, options=method_options)
