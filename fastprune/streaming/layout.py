"""How a model's tensor names map to a checkpoint's keys (as they are, renamed, or one tensor
per expert stacked), and the match of a whole model against a checkpoint, refused at the
first mismatch before any tensor is read."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .shards import FLOAT_NAMES, TensorInfo

# Module names transformers 5 gives that older checkpoints spell differently (Mixtral's sparse
# MoE block was `block_sparse_moe`); tried when a name is not in the checkpoint as it is.
_RENAMES: tuple[tuple[str, str], ...] = ((".mlp.", ".block_sparse_moe."),)
# Per-expert linear names (gate, up, down) of checkpoints that store each expert separately
# while transformers 5 holds one fused `experts.gate_up_proj` / `experts.down_proj` tensor.
_EXPERT_NAMES: tuple[tuple[str, str, str], ...] = (
    ("gate_proj", "up_proj", "down_proj"),
    ("w1", "w3", "w2"),
)


@dataclass(frozen=True)
class Source:
    """Where one model tensor comes from: `groups` of checkpoint keys. One group of one key is
    the tensor itself; otherwise each group's tensors (one per expert) are stacked on a new
    dim 0 and the groups concatenated on dim 1 (`[gate; up]` of fused experts)."""

    groups: tuple[tuple[str, ...], ...]

    @property
    def direct(self) -> bool:
        return len(self.groups) == 1 and len(self.groups[0]) == 1

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for g in self.groups for k in g)

    def shape(self, info: dict[str, TensorInfo]) -> tuple[int, ...] | None:
        """The assembled shape, or None when the pieces do not fit together."""
        if self.direct:
            return info[self.groups[0][0]].shape
        kinds = {info[k].shape for g in self.groups for k in g}
        if len(kinds) != 1 or len({len(g) for g in self.groups}) != 1:
            return None
        piece = next(iter(kinds))
        if not piece:
            return None
        return (len(self.groups[0]), piece[0] * len(self.groups), *piece[1:])

    def assemble(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.direct:
            return tensors[self.groups[0][0]]
        stacked = [torch.stack([tensors[k] for k in g]) for g in self.groups]
        return stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1)

    def split(self, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The inverse of `assemble`: (checkpoint key, tensor) pairs in the source layout."""
        if self.direct:
            yield self.groups[0][0], tensor
            return
        for g, part in zip(self.groups, tensor.chunk(len(self.groups), dim=1)):
            yield from zip(g, part.unbind(0))


def resolve_source(
    tensors: dict[str, TensorInfo], name: str, shape: tuple[int, ...]
) -> Source | None:
    """The checkpoint tensors (of `tensors`) of model tensor `name` of `shape`: as it is,
    renamed, or per-expert; None when the checkpoint has none."""
    if name in tensors:
        return Source(((name,),))
    for new, old in _RENAMES:
        alt = name.replace(new, old)
        if new in name and alt in tensors:
            return Source(((alt,),))
    base, _, leaf = name.rpartition(".")
    if len(shape) != 3 or not base.endswith("experts") or leaf not in ("gate_up_proj", "down_proj"):
        return None
    bases = [base] + [base.replace(n, o) for n, o in _RENAMES if n in base]
    for b in bases:
        for gate, up, down in _EXPERT_NAMES:
            parts = (gate, up) if leaf == "gate_up_proj" else (down,)
            groups = tuple(tuple(f"{b}.{e}.{p}.weight" for e in range(shape[0])) for p in parts)
            if all(k in tensors for g in groups for k in g):
                return Source(groups)
    return None


def match_model(
    model: nn.Module, tensors: dict[str, TensorInfo], path: Path
) -> tuple[dict[str, Source], dict[str, tuple[str, ...]]]:
    """Match `model` against the checkpoint at `path` holding `tensors`: every parameter has
    its tensor(s), of its shape and a floating dtype (a tied head may be absent); every
    checkpoint tensor feeds a parameter or persistent buffer. Raises `ValueError` naming the
    first mismatch. Returns the match (model tensor name -> Source) and the tied weights
    (each name of a shared parameter -> all its names)."""
    ignore = [
        re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    ]
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    plan: dict[str, Source] = {}
    missing: list[str] = []
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    for names in by_id.values():
        found = {n: resolve_source(tensors, n, shapes[n]) for n in names}
        hit = next((s for s in found.values() if s is not None), None)
        if hit is None:
            missing.append(names[0])
            continue
        for n in names:
            plan[n] = found[n] or hit
    persistent = {
        f"{mname}.{b}" if mname else b
        for mname, m in model.named_modules()
        for b in m._buffers
        if b not in m._non_persistent_buffers_set and m._buffers[b] is not None
    }
    buffers = dict(model.named_buffers())
    for name in sorted(persistent):
        if name in tensors:
            plan[name] = Source(((name,),))
    used = {k for s in plan.values() for k in s.keys}
    unused = [k for k in tensors if k not in used and not any(r.search(k) for r in ignore)]
    cls = type(model).__name__
    if missing:
        hint = f"; the checkpoint has {unused[0]!r}, which matches nothing" if unused else ""
        raise ValueError(
            f"checkpoint {path} has no tensor for {cls} parameter {missing[0]!r} "
            f"(shape {list(shapes[missing[0]])}){hint}: a layout whose names need a "
            "conversion fastprune does not support, or a checkpoint of another model"
        )
    if unused:
        raise ValueError(
            f"checkpoint tensor {unused[0]!r} (shape {list(tensors[unused[0]].shape)}) "
            f"maps to no parameter or persistent buffer of {cls}: its names need a "
            "conversion fastprune does not support, or it belongs to another model"
        )
    for name, src in plan.items():
        for k in src.keys:
            dt = tensors[k].dtype
            want_float = name not in buffers or buffers[name].is_floating_point()
            if want_float and dt not in FLOAT_NAMES:
                raise ValueError(
                    f"checkpoint tensor {k!r} has dtype {dt}; {cls} {name!r} expects a "
                    f"floating dtype ({', '.join(FLOAT_NAMES)})"
                )
        got = src.shape(tensors)
        want = shapes[name] if name in shapes else tuple(buffers[name].shape)
        if got != want:
            pieces = (
                f"checkpoint tensor {src.keys[0]!r} has shape {list(tensors[src.keys[0]].shape)}"
                if src.direct
                else f"its {len(src.keys)} per-expert tensors ({src.keys[0]!r}, ...) do not "
                f"stack to it (got {None if got is None else list(got)})"
            )
            raise ValueError(f"{cls} {name!r} expects shape {list(want)}; {pieces}")
    ties = {n: tuple(names) for names in by_id.values() if len(names) > 1 for n in names}
    return plan, ties


__all__ = ["Source", "match_model", "resolve_source"]
