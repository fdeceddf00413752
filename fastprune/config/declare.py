"""How an option is declared once (`Option`, `option`) and what is made from the
declarations: the list of a class's options, argparse arguments, job fields, checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    it differs from `prune_model`'s; `in_job=False`: not a field of a workflow job
    (prune_n/prune_m: the job's `pattern`). `agreed`: every rank must be given the same
    value."""

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
        numeric = isinstance(default, int | float) and not isinstance(default, bool)
        if numeric and not kw.keys() & {"action", "type", "choices"}:
            kw["type"] = type(default)
        kw.setdefault("help", opt.text)  # `cli` may word the flag's help its own way
        parser.add_argument(opt.flag_name, dest=key, default=default, **kw)


def _field_like(f: dataclasses.Field, default: Any) -> dataclasses.Field:
    if default is dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=default, metadata=f.metadata)


def job_fields(cls: type) -> list[tuple[str, str, dataclasses.Field]]:
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
