"""How a model's tensor names map to a checkpoint's keys (as they are, renamed, or one tensor
per expert stacked; a compressed-tensors linear read back dequantized), and the match of a
whole model against a checkpoint, refused at the first mismatch before any tensor is read."""

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
# a compressed-tensors linear's tensors (`X.weight_packed`, ...; fp8: `X.weight` itself)
_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight")
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
    dim 0 and the groups concatenated on dim 1 (`[gate; up]` of fused experts). `quant`: the
    keys (`X.weight`) are compressed-tensors linears, each read from its `parts` (`X.
    weight_packed`, `X.weight_scale`, ...) and dequantized with this grid
    (`compressed.scheme_args`)."""

    groups: tuple[tuple[str, ...], ...]
    quant: tuple[tuple[str, object], ...] | None = None
    parts: tuple[str, ...] = ()

    @property
    def direct(self) -> bool:
        return len(self.groups) == 1 and len(self.groups[0]) == 1 and self.quant is None

    @property
    def weights(self) -> tuple[str, ...]:
        """The tensors assembled (the linears' weights where compressed)."""
        return tuple(k for g in self.groups for k in g)

    @property
    def keys(self) -> tuple[str, ...]:
        """The checkpoint tensors read."""
        if self.quant is None:
            return self.weights
        return tuple(f"{k[: -len('weight')]}{p}" for k in self.weights for p in self.parts)

    def shape(
        self, info: dict[str, TensorInfo], want: tuple[int, ...] | None = None
    ) -> tuple[int, ...] | None:
        """The assembled shape, or None when the pieces do not fit together (`want`: the
        model's, which a packed linear's columns are checked against)."""
        if self.direct:
            return info[self.groups[0][0]].shape
        kinds = {self._piece(info, k, want) for g in self.groups for k in g}
        if len(kinds) != 1 or len({len(g) for g in self.groups}) != 1:
            return None
        piece = next(iter(kinds))
        if not piece:
            return None
        if len(self.groups) == 1 and len(self.groups[0]) == 1:
            return piece
        return (len(self.groups[0]), piece[0] * len(self.groups), *piece[1:])

    def _piece(self, info: dict[str, TensorInfo], key: str, want) -> tuple[int, ...]:
        if self.quant is None:
            return info[key].shape
        base = key[: -len("weight")]
        rows = info[f"{base}weight_scale"].shape[0]
        if f"{base}weight" in info:  # fp8: the codes are the weight's shape
            return info[f"{base}weight"].shape
        bits, packed = dict(self.quant)["num_bits"], info[f"{base}weight_packed"].shape[1]
        cols = want[-1] if want and -(-want[-1] * bits // 32) == packed else -1
        return (rows, cols)

    def assemble(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.direct:
            return tensors[self.groups[0][0]]
        if self.quant is not None:
            from .compressed import dequantized

            args = dict(self.quant)
            tensors = {
                k: dequantized({p: tensors[f"{k[: -len('weight')]}{p}"] for p in self.parts}, args)
                for k in self.weights
            }
            if len(self.groups) == 1 and len(self.groups[0]) == 1:
                return tensors[self.groups[0][0]]
        stacked = [torch.stack([tensors[k] for k in g]) for g in self.groups]
        return stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=1)

    def split(self, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The inverse of `assemble`: (checkpoint key, tensor) pairs in the source layout."""
        if self.direct:
            yield self.groups[0][0], tensor
            return
        if len(self.groups) == 1 and len(self.groups[0]) == 1:  # one compressed linear
            yield self.groups[0][0], tensor
            return
        for g, part in zip(self.groups, tensor.chunk(len(self.groups), dim=1)):
            yield from zip(g, part.unbind(0))


def _compressed(tensors: dict[str, TensorInfo], key: str, quant) -> bool:
    """Whether checkpoint weight `key` (`X.weight`) is a compressed-tensors linear."""
    return quant is not None and key.endswith(".weight") and f"{key}_scale" in tensors


def _source(tensors, groups, quant) -> Source | None:
    """`groups` of weights as a Source when all are in the checkpoint (all compressed, or none)."""
    keys = [k for g in groups for k in g]
    packed = [_compressed(tensors, k, quant) for k in keys]
    if all(packed):
        base = keys[0][: -len("weight")]
        parts = tuple(p for p in _SUFFIXES if f"{base}{p}" in tensors)
        return Source(tuple(groups), tuple(sorted(quant.items())), parts)
    if not any(packed) and all(k in tensors for k in keys):
        return Source(tuple(groups))
    return None


def resolve_source(
    tensors: dict[str, TensorInfo], name: str, shape: tuple[int, ...], quant: dict | None = None
) -> Source | None:
    """The checkpoint tensors (of `tensors`) of model tensor `name` of `shape`: as it is,
    renamed, or per-expert (`quant`: the grid of a compressed-tensors checkpoint, whose
    linears are read dequantized); None when the checkpoint has none."""
    candidates = [name] + [name.replace(n, o) for n, o in _RENAMES if n in name]
    for key in candidates:
        src = _source(tensors, ((key,),), quant)
        if src is not None:
            return src
    base, _, leaf = name.rpartition(".")
    if len(shape) != 3 or not base.endswith("experts") or leaf not in ("gate_up_proj", "down_proj"):
        return None
    bases = [base] + [base.replace(n, o) for n, o in _RENAMES if n in base]
    for b in bases:
        for gate, up, down in _EXPERT_NAMES:
            parts = (gate, up) if leaf == "gate_up_proj" else (down,)
            groups = tuple(tuple(f"{b}.{e}.{p}.weight" for e in range(shape[0])) for p in parts)
            src = _source(tensors, groups, quant)
            if src is not None:
                return src
    return None


def match_model(
    model: nn.Module, tensors: dict[str, TensorInfo], path: Path, quant: dict | None = None
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
        found = {n: resolve_source(tensors, n, shapes[n], quant) for n in names}
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
        floats = src.keys if src.quant is None else [k for k in src.keys if k.endswith("_scale")]
        for k in floats:
            dt = tensors[k].dtype
            want_float = name not in buffers or buffers[name].is_floating_point()
            if want_float and dt not in FLOAT_NAMES:
                raise ValueError(
                    f"checkpoint tensor {k!r} has dtype {dt}; {cls} {name!r} expects a "
                    f"floating dtype ({', '.join(FLOAT_NAMES)})"
                )
        want = shapes[name] if name in shapes else tuple(buffers[name].shape)
        got = src.shape(tensors, want)
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
