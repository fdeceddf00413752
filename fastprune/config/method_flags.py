"""The method options the command line offers (`METHOD_FLAGS`): a method's options are its
own (`Method.options`); each flag here sets one of them for every method declaring it."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..solvers.recipes import (
    HELD_OUT_EVERY,
    RECONSTRUCT,
    REFINE_ON,
    REFINERS,
    check_damping_levels,
)
from ..solvers.rose import ROSE_SCALERS
from ..validation import BACKENDS, check_int
from .validators import flag_bool, integer, methods_taking, one_of, optional

GRADIENT_NORMS = ("l1", "l2")  # GBLM's norm of the accumulated gradients

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


def damping_levels_arg(text_value: str) -> tuple[float, ...]:
    """--damping-levels' value: comma-separated damping fractions."""
    try:
        return check_damping_levels([float(x) for x in text_value.split(",") if x.strip()])
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"--damping-levels: {e}") from e


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
    from ..methods import selectors

    return "/".join(selectors())


METHOD_FLAGS = (
    MethodFlag(
        "max_swaps",
        lambda: (
            f"{methods_taking('max_swaps')}: steps per layer (default: a per-layer budget "
            "on CPU, a larger one on GPU, and for the fastprune recipe at most 4 at 2:4 and 16 "
            "otherwise; see fastprune.methods)"
        ),
        _swaps,
        cli={"type": int},
    ),
    MethodFlag(
        "reconstruct",
        lambda: (
            f"{methods_taking('reconstruct')}/{_selectors()}: OBS reconstruction on the "
            "final mask (--reconstruct best: only where it lowers the layer's loss; best_rows: "
            "row by row; lstsq: the least-squares weights on the mask instead, by conjugate "
            "gradients)"
        ),
        one_of(RECONSTRUCT),
        cli={
            "nargs": "?",
            "const": True,
            "type": reconstruct_arg,
            "metavar": "|".join(r for r in RECONSTRUCT if isinstance(r, str)),
        },
    ),  # fmt: skip
    MethodFlag(
        "refit_iters",
        lambda: (
            f"{methods_taking('refit_iters')}/{_selectors()}: conjugate-gradient "
            "iterations of --reconstruct lstsq per layer (default 32)"
        ),
        integer(0),
        cli={"type": int},
    ),
    MethodFlag(
        "rounds",
        lambda: (
            f"{methods_taking('rounds')}/{_selectors()}: with --refine and --reconstruct lstsq, "
            "alternate swaps scored on the refitted weights and refits for up to this many "
            "rounds (default 1)"
        ),
        integer(1),
        cli={"type": int},
    ),
    MethodFlag(
        "damping_levels",
        lambda: (
            f"{methods_taking('damping_levels')}/{_selectors()}: "
            "comma-separated damping fractions (e.g. 0.01,0.05,0.1); each layer takes the one "
            "whose solve on the other calibration samples has the lowest loss on a held-out "
            f"slice of them (every {HELD_OUT_EVERY}th batch), then solves on all samples "
            "(default: none, --percdamp for every layer)"
        ),
        lambda v, name: None if v is None else check_damping_levels(v),
        cli={"type": damping_levels_arg, "metavar": "D1,D2,..."},
    ),
    MethodFlag(
        "refine",
        lambda: f"{_selectors()}/fastprune: refine the method's mask by optimal 1-swaps",
        optional(one_of(REFINERS)),
        cli={"choices": REFINERS},
    ),
    MethodFlag(
        "refine_on",
        lambda: (
            "the kept weights the swaps are scored with: the original W, or the "
            "method's updated weights (sparsegpt/rose; default)"
        ),
        optional(one_of(REFINE_ON)),
        cli={"choices": REFINE_ON},
    ),
    MethodFlag(
        "keep_zeros",
        lambda: (
            f"{methods_taking('keep_zeros')}: weights already zero stay zero, so quantizing "
            "a pruned model keeps its sparsity (default: every weight absorbs rounding errors, "
            "as GPTQ as published)"
        ),
        flag_bool,
        cli={"action": "store_const", "const": True},
    ),
    MethodFlag(
        "score_scaler",
        lambda: (
            f"{methods_taking('score_scaler')}: the pre-pruning score's scaler: hessian = "
            "diag(H)/2 (default); running = the ROSE repository's own, which weights "
            "calibration sample k by 1/k (one sample per batch), with its block-sum range "
            "rule (as fastprune.compat.ROSE)"
        ),
        one_of(ROSE_SCALERS),
        cli={"choices": ROSE_SCALERS},
    ),
    MethodFlag(
        "norm",
        lambda: f"{methods_taking('norm')} gradient norm",
        one_of(GRADIENT_NORMS),
        flag="--gblm-norm",
        cli={"choices": GRADIENT_NORMS},
    ),
    MethodFlag(
        "backend",
        lambda: f"kernels for {methods_taking('backend')} (default auto: the fastest for --device)",
        one_of(BACKENDS),
        cli={"choices": BACKENDS},
    ),
)
METHOD_FLAG_OF = {f.option: f for f in METHOD_FLAGS}


def add_method_flags(parser) -> None:
    """The flags of `METHOD_FLAGS` (default None: each method keeps its own default)."""
    for f in METHOD_FLAGS:
        parser.add_argument(f.flag_name, dest=f.dest, default=None, help=f.help(), **f.cli)
