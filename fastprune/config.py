"""Every option of a prune, declared once: `PruneConfig`.

Each field of `PruneConfig` is one option of `prune_model`: its default, type (the
annotation), help text, validator, command-line flag with its argparse specifics, and whether
every rank of a distributed prune must be given it alike. The `fastprune prune` flags, the
workflow's `PruneJob`, `prune_model`'s keywords and docstring and docs/options.md are made
from it (`options`, `add_arguments`, `options_markdown`). Method options (blocksize, percdamp,
max_swaps, ...) are each method's own (`Method.options`); `METHOD_FLAGS` says which of them
the command line offers, and how. Errors name an option as the caller spells it: `name` maps
an option to its Python keyword (`keyword`, the default) or to its flag (`flag_of`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .experts import MOE_CALIBRATIONS, check_moe_calibration
from .hessian import HESSIAN_KINDS, HESSIAN_PRECISIONS
from .solvers.recipes import RECONSTRUCT, REFINE_ON, REFINERS, SELECTORS
from .validation import BACKENDS, check_int, check_pattern, check_sparsity

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("fastprune")

ALLOCATIONS = ("uniform", "owl")
OWL_THRESHOLD = 5.0  # OWL's M: an outlier scores above M x its block's mean
OWL_LAMBDA = 0.08  # OWL's lambda: block sparsities lie within sparsity +- lambda
# prune_model's positional order before the configuration took its place
LEGACY_ORDER = ("method", "sparsity", "prune_n", "prune_m", "device")

# the name an error gives an option: its Python keyword, or a command-line flag
Name = Callable[[str], str]


def keyword(name: str) -> str:
    """An option spelled as the Python keyword that sets it."""
    return name


def given(name: Name, key: str, value: Any) -> str:
    """`key`'s value as the caller wrote it: `allocation='owl'` or `--allocation owl`."""
    spelled = name(key)
    return f"{spelled} {value}" if spelled.startswith("-") else f"{spelled}={value!r}"


class _Same:
    def __repr__(self) -> str:
        return "the same"


SAME: Any = _Same()  # a workflow default equal to prune_model's


@dataclass(frozen=True)
class Option:
    """How one option is offered, checked and documented (its name, default and type are
    its dataclass field's). `check(value, spelled name)` returns the value, normalised.
    `flag`: "" derives `--the-name`, None means Python only; `argument=False` spells errors
    with `flag` without adding an argument of its own (prune_n/prune_m are `--pattern`).
    `cli`: argparse specifics. `job_default`: the command's and `PruneJob`'s default where
    it differs from `prune_model`'s. `agreed`: every rank must be given the same value."""

    help: str | Callable[[], str]
    check: Callable[[Any, str], Any] | None = None
    flag: str | None = ""
    argument: bool = True
    cli: Mapping[str, Any] = field(default_factory=dict)
    agreed: bool = False
    job_default: Any = SAME
    in_job: bool = True
    name: str = ""
    default: Any = None
    type: str = ""

    @property
    def text(self) -> str:
        return self.help() if callable(self.help) else self.help

    @property
    def flag_name(self) -> str | None:
        if self.flag is None:
            return None
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def command_default(self) -> Any:
        return self.default if self.job_default is SAME else self.job_default


def option(default: Any = None, help: str | Callable[[], str] = "", *, factory=None, **kw) -> Any:
    """A dataclass field declaring an option (see `Option`)."""
    meta = {"option": Option(help, **kw)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def options(cls: type) -> dict[str, Option]:
    """The options `cls` (a dataclass made of `option` fields) declares, by name, with their
    name, default and type filled in."""
    out = {}
    for f in dataclasses.fields(cls):
        opt = f.metadata.get("option")
        if opt is None:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[f.name] = dataclasses.replace(opt, name=f.name, default=default, type=str(f.type))
    return out


# ------------------------------------------------------------------------------ validators


def _same(value: Any, choice: Any) -> bool:
    """`value` is `choice` (True and False only as themselves, never as 1 and 0)."""
    if isinstance(value, bool) or isinstance(choice, bool):
        return value is choice
    return value == choice


def one_of(choices: tuple | Callable[[], tuple]) -> Callable[[Any, str], Any]:
    def check(value: Any, name: str) -> Any:
        allowed = choices() if callable(choices) else choices
        if not any(_same(value, c) for c in allowed):
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value

    return check


def integer(minimum: int | None = None) -> Callable[[Any, str], int]:
    def check(value: Any, name: str) -> int:
        if minimum is None:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
            return int(value)
        return check_int(value, name, minimum)

    return check


def number_in(lo: float, hi: float) -> Callable[[Any, str], float]:
    """A real number in the open interval (lo, hi)."""

    def check(value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not lo < value < hi:
            raise ValueError(f"{name} must be a number in ({lo}, {hi}), got {value!r}")
        return float(value)

    return check


def flag_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda value, name: None if value is None else check(value, name)


def text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r}")
    return value


def patterns(value: Any, name: str):
    """None, one glob pattern, or a list of them."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(p, str) for p in value):
        return list(value)
    raise TypeError(f"{name} must be a glob pattern or a list of them, got {value!r}")


def check_method(value: Any, name: str) -> str:
    from .methods import METHODS

    if not isinstance(value, str) or value not in METHODS:
        raise ValueError(f"{name} must be one of {', '.join(METHODS)}, got {value!r}")
    return value


def check_device(spec: Any, name: str):
    """A device this machine has (None: the model's own)."""
    import torch

    if spec is None:
        return None
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} {spec!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {spec!r}: CUDA is not available on this machine")
    return spec


def _method_names() -> str:
    from .methods import METHODS

    return " | ".join(METHODS)


def _methods_with(option_name: str) -> str:
    from .methods import methods_with

    return "/".join(methods_with(option_name))


# ------------------------------------------------------------------------------ the config


@dataclass(frozen=True)
class PruneConfig:
    """The options of one prune (`prune_model`, `prune_checkpoint`, `fastprune prune`);
    `options` are the method's own (`METHODS[method].options`, with refine/reconstruct for a
    mask selector)."""

    method: str = option("rose", _method_names, check=check_method, agreed=True)
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
        "the reference's float32 arithmetic; exact: always the reference's",
        check=one_of(HESSIAN_PRECISIONS), cli={"choices": HESSIAN_PRECISIONS}, agreed=True,
    )  # fmt: skip
    hessian_kind: str = option(
        "auto",
        "what is accumulated per layer input: the full H, or its diagonal alone (all Wanda "
        "and GBLM read: no GEMM, cols floats; their layers then report no loss); auto: the "
        "diagonal for those methods, the full H otherwise",
        check=one_of(HESSIAN_KINDS), cli={"choices": HESSIAN_KINDS}, agreed=True,
    )  # fmt: skip
    moe_calibration: str = option(
        "routed",
        "MoE experts' Hessians: routed (the tokens the router sends each expert) or all "
        "(every token through every expert; the block's output still follows the router)",
        check=check_moe_calibration, cli={"choices": MOE_CALIBRATIONS}, agreed=True,
    )  # fmt: skip
    asymmetric: bool = option(
        False,
        "fit each layer to the dense model's outputs from the pruned model's inputs "
        "(GPTAQ-style asymmetric calibration: a weight correction before the method prunes; "
        "dense models, one process; twice the calibration forwards and activations)",
        check=flag_bool, cli={"action": "store_true"}, agreed=True,
    )  # fmt: skip
    targets: str | list[str] | None = option(
        None, "glob patterns of layers to prune", check=patterns, cli={"nargs": "+"},
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
        OWL_THRESHOLD, f"owl: an outlier scores above this x its block's mean (default {OWL_THRESHOLD})",
        check=number_in(0.0, math.inf), agreed=True,
    )  # fmt: skip
    owl_lambda: float = option(
        OWL_LAMBDA, f"owl: block sparsities within sparsity +- this (default {OWL_LAMBDA})",
        check=number_in(0.0, 0.5), agreed=True,
    )  # fmt: skip
    progress: bool = option(
        True, "show progress bars (the command: --no-progress hides them)", flag="--no-progress",
        cli={"action": "store_false"},
    )  # fmt: skip
    options: Mapping[str, Any] = option(
        help="the method's own options (see METHOD_FLAGS for those the command offers)",
        factory=dict, flag=None,
    )  # fmt: skip


# ------------------------------------------------------------------ method options' flags


def reconstruct_arg(text_value: str):
    """--reconstruct's value: one of `RECONSTRUCT`'s names (no value: True)."""
    names = [r for r in RECONSTRUCT if isinstance(r, str)]
    if text_value not in names:
        listed = ", ".join(repr(r) for r in names[:-1]) + f" or {names[-1]!r}"
        raise argparse.ArgumentTypeError(
            f"--reconstruct takes no value, {listed}, got {text_value!r}"
        )
    return text_value


def _swaps(value: Any, name: str):
    return value if value in ("auto", None) else check_int(value, name, 0)


@dataclass(frozen=True)
class MethodFlag:
    """A command-line flag that sets method option `option` of every method declaring it
    (left unset, each method keeps its default). `check(value, spelled name)`."""

    option: str
    help: Callable[[], str]
    check: Callable[[Any, str], Any]
    flag: str = ""
    cli: Mapping[str, Any] = field(default_factory=dict)

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.option.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.flag_name[2:].replace("-", "_")


def _selectors() -> str:
    return "/".join(SELECTORS)


METHOD_FLAGS = (
    MethodFlag(
        "max_swaps",
        lambda: f"{_methods_with('max_swaps')}: steps per layer (default: a per-layer budget "
        "on CPU, a larger one on GPU, and for the fastprune recipe at most 4 at 2:4 and 16 "
        "otherwise; see fastprune.methods)",
        _swaps,
        cli={"type": int},
    ),
    MethodFlag(
        "reconstruct",
        lambda: f"{_methods_with('reconstruct')}/{_selectors()}: OBS reconstruction on the "
        "final mask (--reconstruct best: only where it lowers the layer's loss; best_rows: "
        "row by row; lstsq: the least-squares weights on the mask instead, by conjugate "
        "gradients)",
        one_of(RECONSTRUCT),
        cli={
            "nargs": "?", "const": True, "type": reconstruct_arg,
            "metavar": "|".join(r for r in RECONSTRUCT if isinstance(r, str)),
        },
    ),  # fmt: skip
    MethodFlag(
        "refit_iters",
        lambda: f"{_methods_with('refit_iters')}/{_selectors()}: conjugate-gradient "
        "iterations of --reconstruct lstsq per layer (default 32)",
        integer(0),
        cli={"type": int},
    ),
    MethodFlag(
        "refine",
        lambda: f"{_selectors()}/fastprune: refine the method's mask by optimal 1-swaps",
        optional(one_of(REFINERS)),
        cli={"choices": REFINERS},
    ),
    MethodFlag(
        "refine_on",
        lambda: "the kept weights the swaps are scored with: the original W, or the "
        "method's updated weights (sparsegpt/rose; default)",
        optional(one_of(REFINE_ON)),
        cli={"choices": REFINE_ON},
    ),
    MethodFlag(
        "norm",
        lambda: f"{_methods_with('norm')} gradient norm",
        one_of(("l1", "l2")),
        flag="--gblm-norm",
        cli={"choices": ("l1", "l2")},
    ),
    MethodFlag(
        "backend",
        lambda: f"kernels for {_methods_with('backend')} (default auto: the fastest for "
        "--device)",
        one_of(BACKENDS),
        cli={"choices": BACKENDS},
    ),
)
METHOD_FLAG_OF = {f.option: f for f in METHOD_FLAGS}


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
    with refine/reconstruct where asked) and its full options."""

    config: PruneConfig
    method: Any
    options: dict


def check_method_options(method: str, options: Mapping[str, Any], name: Name = keyword):
    """The `Method` that runs and its options (defaults filled in): values of the options
    the command line offers checked as `name` spells them, then the method's own check
    (`TypeError` for an option it does not take)."""
    from .methods import composed, get_method

    given_options = dict(options)
    for key, value in given_options.items():
        if key in METHOD_FLAG_OF:
            given_options[key] = METHOD_FLAG_OF[key].check(value, name(key))
    meth = composed(get_method(method), given_options)
    return meth, meth.check_options(given_options)


def check_config(config: PruneConfig, name: Name = keyword) -> Checked:
    """Every option of `config` checked once, errors naming it as `name` spells it; the
    relations between options (pattern, allocation, asymmetric, hessian_kind vs. method)
    checked and resolved."""
    values = {}
    for key, opt in options(type(config)).items():
        value = getattr(config, key)
        values[key] = value if opt.check is None else opt.check(value, name(key))
    meth, opts = check_method_options(values["method"], values["options"], name)
    n, m = check_pattern(values["prune_n"], values["prune_m"], values["prune_m"] or 1)
    method = values["method"]
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
        kind = "full"
    elif kind == "auto":
        kind = "diagonal" if meth.reads_diagonal else "full"
    elif kind == "diagonal" and not meth.reads_diagonal:
        raise ValueError(
            f"{given(name, 'hessian_kind', 'diagonal')} does not fit {meth.name!r}, which "
            "needs the full H (only Wanda and GBLM read diag(H) alone)"
        )
    values.update(prune_n=n, prune_m=m, allocation=allocation, hessian_kind=kind)
    return Checked(dataclasses.replace(config, **values), meth, opts)


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


def extend(cls: type, name: str, annotation: str, spec: Any) -> type:
    """`cls` with one more option `name` (`spec` from `option(...)`): the command line,
    `prune_model`'s keywords and checks and the docs table take it from here alone."""
    return dataclasses.make_dataclass(
        cls.__name__, [(name, annotation, spec)], bases=(cls,), frozen=True
    )


def add_arguments(parser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """An argparse argument for every option of `cls` that has one (`Option.argument`),
    with the command's default."""
    for key, opt in options(cls).items():
        if key in skip or opt.flag_name is None or not opt.argument:
            continue
        kw = dict(opt.cli)
        default = opt.command_default
        if not kw.keys() & {"action", "type", "choices"}:
            if isinstance(default, int | float) and not isinstance(default, bool):
                kw["type"] = type(default)
        parser.add_argument(opt.flag_name, dest=key, default=default, help=opt.text, **kw)


def add_method_flags(parser) -> None:
    """The flags of `METHOD_FLAGS` (default None: each method keeps its own default)."""
    for f in METHOD_FLAGS:
        parser.add_argument(f.flag_name, dest=f.dest, default=None, help=f.help(), **f.cli)


# ------------------------------------------------------------------------------ docs


def _cell(value: Any) -> str:
    return "`" + repr(value) + "`"


def options_markdown(cls: type = PruneConfig) -> str:
    """docs/options.md: the table of `cls`'s options and of the method options' flags."""
    from .methods import methods_with

    lines = [
        "# Options",
        "",
        "Generated from `fastprune.config` (`options_markdown()`); do not edit by hand.",
        "Each option is a field of `PruneConfig`, a keyword of `prune_model` /",
        "`prune_checkpoint`, a field of `fastprune.workflow.PruneJob` and, where it has one,",
        "a flag of `fastprune prune`. `agreed`: every rank of a distributed prune must be",
        "given the same value.",
        "",
        "| option | flag | type | default | command default | agreed | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, opt in options(cls).items():
        flag = opt.flag_name or "(Python only)"
        cmd = "" if opt.job_default is SAME else _cell(opt.job_default)
        meaning = " ".join(opt.text.split()).replace("|", "\\|")
        lines.append(
            f"| `{key}` | `{flag}` | `{opt.type}` | {_cell(opt.default)} | {cmd} | "
            f"{'yes' if opt.agreed else ''} | {meaning} |"
        )
    lines += [
        "",
        "## Method options on the command line",
        "",
        "A method's own options (`Method.options`) are keywords of `prune_model` too. These",
        "flags set one of them for every method that declares it; unset, each keeps its",
        "default.",
        "",
        "| option | flag | methods | meaning |",
        "|---|---|---|---|",
    ]
    for f in METHOD_FLAGS:
        meaning = " ".join(f.help().split()).replace("|", "\\|")
        lines.append(
            f"| `{f.option}` | `{f.flag_name}` | {', '.join(methods_with(f.option))} | {meaning} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ jobs


def _field_like(f: dataclasses.Field, default: Any) -> dataclasses.Field:
    if default is dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=default, metadata=f.metadata)


def job_fields(cls: type = PruneConfig) -> list[tuple[str, str, dataclasses.Field]]:
    """The options of `cls` a workflow job carries (`Option.in_job`), with the command's
    defaults, as `dataclasses.make_dataclass` fields."""
    out = []
    for f in dataclasses.fields(cls):
        opt = f.metadata.get("option")
        if opt is None or not opt.in_job:
            continue
        default = f.default if opt.job_default is SAME else opt.job_default
        out.append((f.name, f.type, _field_like(f, default)))
    return out


def reuse(cls: type, name: str) -> Any:
    """A field declaring the same option as `cls`'s field `name`, with the command's
    default (another job offering it)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    opt = f.metadata["option"]
    return _field_like(f, f.default if opt.job_default is SAME else opt.job_default)


def check_declared(obj: Any, name: Name = keyword, skip: Any = ()) -> None:
    """Every option `obj`'s dataclass declares with a validator, checked (those in `skip`
    are checked elsewhere)."""
    for key, opt in options(type(obj)).items():
        if key not in skip and opt.check is not None:
            opt.check(getattr(obj, key), name(key))
