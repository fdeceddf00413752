"""The pre-flight's replay of one decoder block: its arguments as recorded when it was called
(containers copied, tensors shared), the block run again on them, and how far its output is
from the real forward's."""

from __future__ import annotations

import torch

from .capture import _block_output, _same_structure, _sanitize_kwargs, to_device


def tensors(obj):
    """Every tensor in `obj` (nested tuples, lists and dict values)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, tuple | list):
        for o in obj:
            yield from tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors(o)


def snapshot(obj):
    """A structural copy (containers copied, tensors shared) taken when a block is called, so
    a dict or list the model fills later does not change what was recorded."""
    if isinstance(obj, tuple | list):
        return type(obj)(snapshot(o) for o in obj) if type(obj) in (tuple, list) else obj
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    return obj


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """`|y - ref| / |ref|` in float64; infinite for another shape."""
    y, ref = y.double(), ref.double()
    if y.shape != ref.shape:
        return float("inf")
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def replay_block(block, hidden, rest, kw, ref) -> tuple[float, str | None]:
    """`block` run on `hidden` with the recorded arguments: its relative error against `ref`
    and, if it raised, the error (the error then infinite)."""
    dev = next(block.parameters()).device
    hidden = hidden.to(dev)
    try:
        y = _block_output(
            block(hidden, *to_device(rest, dev), **to_device(_sanitize_kwargs(kw), dev))
        )
    except Exception as e:  # a replay that fails differs from the real forward
        return float("inf"), f"{type(e).__name__}: {e}"
    return rel_error(y.cpu(), ref), None


def differing(own, first) -> list[str]:
    """The arguments (positional ones by position) in which two recorded calls differ."""
    (ra, rk), (fa, fk) = own, first
    names = [f"positional argument {j + 1}" for j in range(max(len(ra), len(fa)))
             if j >= len(ra) or j >= len(fa) or not _same_structure(ra[j], fa[j])]  # fmt: skip
    names += sorted(k for k in set(rk) | set(fk)
                    if k not in rk or k not in fk or not _same_structure(rk[k], fk[k]))  # fmt: skip
    return names


def matrices_of(i: int, block) -> dict:
    """id of each matrix of block `i` -> (the matrix, i, its module's path)."""
    return {id(p): (p, i, path) for path, mod in block.named_modules()
            for p in mod.parameters(recurse=False) if p.dim() >= 2}  # fmt: skip


class OnDemand:
    """A streamed model's blocks in the pre-flight: block `i` loaded (`source.load(i)`) when
    it is called, its matrices then known to the provenance, and released
    (`source.release(i)`) once its record is taken."""

    def __init__(self, blocks, mode, source):
        self.blocks, self.mode, self.source = blocks, mode, source
        self.held: set[int] = set()
        self.handles = [b.register_forward_pre_hook(self._load(i)) for i, b in enumerate(blocks)]

    def _load(self, i: int):
        def hook(_mod, _args):
            if i not in self.held:
                replaying, self.mode.replaying = self.mode.replaying, True  # loads untraced
                try:
                    self.source.load(i)
                finally:
                    self.mode.replaying = replaying
                self.held.add(i)
                self.mode.owners.update(matrices_of(i, self.blocks[i]))

        return hook

    def release(self, i: int) -> None:
        if i in self.held:
            self.held.discard(i)
            for key in [k for k, v in self.mode.owners.items() if v[1] == i]:
                del self.mode.owners[key]
            self.source.release(i)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for i in sorted(self.held):
            self.release(i)
