"""Loading one module's tensors at a time from a checkpoint's shards into a meta-device
skeleton, and releasing them again: what keeps a model bigger than host memory within it."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..validation import all_finite, non_finite_error
from .layout import Source, match_model, resolve_source
from .shards import TensorInfo, open_safetensors


class BlockLoader:
    """The part of `Checkpoint` that moves weights: given the checkpoint's `path` and
    `tensors`, it matches a skeleton (`check_model`) and then loads and releases one of its
    modules at a time."""

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], quant: dict | None = None):
        self.path = path
        self.tensors = tensors
        self.quant = quant  # a compressed-tensors checkpoint's grid: its linears dequantized
        self._plan: dict[str, Source] = {}
        self._ties: dict[str, tuple[str, ...]] = {}
        self._root: weakref.ref | None = None

    def check_model(self, model: nn.Module) -> None:
        """Match `model` (usually `skeleton()`) against the checkpoint (`match_model`): every
        parameter has its tensor(s), of its shape and a floating dtype (a tied head may be
        absent); every checkpoint tensor feeds a parameter or persistent buffer. Raises
        `ValueError` naming the first mismatch. Remembers the match for `load` and the
        model's tied weights."""
        self._plan, self._ties = match_model(model, self.tensors, self.path, self.quant)
        self._root = weakref.ref(model)

    def _model(self) -> nn.Module | None:
        """The model last matched by `check_model`, while it lives."""
        return self._root() if self._root is not None else None

    def source(self, name: str, shape: Sequence[int] | None = None) -> Source:
        """Where model tensor `name` (full name) comes from in the checkpoint."""
        src = self._plan.get(name)
        if src is None and shape is not None:
            src = resolve_source(self.tensors, name, tuple(shape), self.quant)
        if src is None:
            raise ValueError(f"checkpoint {self.path} has no tensor for {name!r}")
        return src

    def source_tensors(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """`tensor` (model tensor `name`) as the checkpoint stores it: (key, tensor) pairs, per
        expert where the checkpoint keeps experts apart. For writing in the source layout."""
        return self.source(name, tensor.shape).split(tensor)

    def _slots(self, module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str, str]]:
        """(full name, owning module, attribute, kind) of every parameter and persistent buffer
        of `module`, shared parameters once per owner."""
        pre = f"{prefix}." if prefix else ""
        for mname, m in module.named_modules(remove_duplicate=False):
            for attr, p in m._parameters.items():
                if p is not None:
                    yield f"{pre}{mname}.{attr}" if mname else f"{pre}{attr}", m, attr, "param"
            for attr, b in m._buffers.items():
                if b is not None and attr not in m._non_persistent_buffers_set:
                    yield f"{pre}{mname}.{attr}" if mname else f"{pre}{attr}", m, attr, "buffer"

    def _tied_owners(self, name: str) -> list[tuple[nn.Module, str]]:
        root = self._model()
        if root is None:
            return []
        out = []
        for other in self._ties.get(name, ()):
            if other != name:
                mname, _, attr = other.rpartition(".")
                out.append((root.get_submodule(mname) if mname else root, attr))
        return out

    @torch.no_grad()
    def load(
        self,
        module: nn.Module,
        prefix: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        skip: Iterable[str] = (),
    ) -> int:
        """Read the parameters (and checkpoint-held persistent buffers) of `module`, the
        submodule of the skeleton called `prefix` (`model.layers.3`; "" for the whole model),
        from the shards onto `device`, parameters cast to `dtype` (default: the skeleton's
        dtype; buffers keep theirs),
        replacing the meta tensors in place; tied parameters elsewhere in the model follow.
        Names under any prefix in `skip` are left alone. Returns the bytes read."""
        root = self._model()
        if root is not None and any(m is module for m in root.modules()):
            try:
                named = root.get_submodule(prefix) if prefix else root
            except AttributeError:
                named = None
            if named is not module:
                raise ValueError(f"load(prefix={prefix!r}): that is not the name of the module")
        skip = tuple(s.rstrip(".") + "." for s in skip)
        todo: dict[int, tuple[str, Source, list[tuple[nn.Module, str, str]]]] = {}
        for name, m, attr, kind in self._slots(module, prefix):
            if skip and any(name.startswith(s) for s in skip):
                continue
            t = getattr(m, attr)
            if kind == "buffer" and name not in self._plan and name not in self.tensors:
                continue  # a persistent buffer the checkpoint does not hold keeps its value
            key = id(t)
            if key not in todo:
                todo[key] = (name, self.source(name, t.shape), [])
            todo[key][2].append((m, attr, kind))
        by_shard: dict[str, list[str]] = {}
        for _, src, _ in todo.values():
            for k in src.keys:
                shard = self.tensors[k].shard
                if k not in by_shard.setdefault(shard, []):
                    by_shard[shard].append(k)
        read: dict[str, torch.Tensor] = {}
        nbytes = 0
        for shard, keys in by_shard.items():
            with open_safetensors(self.path / shard) as f:
                for k in keys:
                    t = f.get_tensor(k)
                    if not all_finite(t):  # named here, before it can reach a block or the output
                        raise non_finite_error(t, f"checkpoint tensor {k!r} (in {shard})")
                    read[k] = t
                    nbytes += self.tensors[k].nbytes
        for name, src, owners in todo.values():
            m0, attr0, kind = owners[0]
            old = getattr(m0, attr0)
            cast = dtype if dtype is not None and kind == "param" else old.dtype
            value = src.assemble(read).to(device=device, dtype=cast)
            if kind == "param":
                new = nn.Parameter(value, requires_grad=False)
                for m, attr in [(m, a) for m, a, _ in owners] + self._tied_owners(name):
                    m._parameters[attr] = new
            else:
                for m, attr, _ in owners:
                    m._buffers[attr] = value
            for k in src.keys:
                read.pop(k, None)
        return nbytes

    def release(self, module: nn.Module) -> None:
        """Put every parameter of `module` back on the meta device (tied parameters elsewhere
        follow), freeing its memory; buffers keep their values."""
        root = self._model()
        names = {}
        if root is not None:
            names = {id(p): n for n, p in root.named_parameters()}
        done: dict[int, nn.Parameter] = {}
        for m in module.modules():
            for attr, p in m._parameters.items():
                if p is None or p.device.type == "meta":
                    continue
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(
                        torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
                    )
                    for om, oattr in self._tied_owners(names.get(id(p), "")):
                        om._parameters[oattr] = done[id(p)]
                m._parameters[attr] = done[id(p)]

    def module_params(
        self, module: nn.Module, prefix: str = "", skip: Iterable[str] = ()
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """`module`'s loaded parameters and the persistent buffers the checkpoint holds:
        (full name, tensor) pairs, every slot (a tied weight under each of its names). Names
        under a prefix in `skip` are left out."""
        skip = tuple(s.rstrip(".") + "." for s in skip)
        for name, m, attr, kind in self._slots(module, prefix):
            if skip and any(name.startswith(s) for s in skip):
                continue
            if kind == "buffer" and name not in self._plan and name not in self.tensors:
                continue
            t = getattr(m, attr)
            if t.device.type == "meta":
                raise ValueError(f"{name} is not loaded (on the meta device): nothing to write")
            yield name, t

    def module_tensors(
        self, module: nn.Module, prefix: str = "", skip: Iterable[str] = ()
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """`module`'s loaded parameters and the persistent buffers the checkpoint holds, as
        the checkpoint stores them: (checkpoint key, tensor) pairs, per expert where it keeps
        experts apart, each key once (a tied weight is written where it is stored). Names
        under a prefix in `skip` are left out. For writing a pruned module in place of its
        source tensors."""
        seen: set[str] = set()
        for name, t in self.module_params(module, prefix, skip):
            for key, part in self.source_tensors(name, t):
                if key not in seen:
                    seen.add(key)
                    yield key, part

    def meta_names(self, module: nn.Module, prefix: str = "") -> list[str]:
        """Full names of `module`'s parameters still on the meta device."""
        pre = f"{prefix}." if prefix else ""
        return [
            pre + n
            for n, p in module.named_parameters(remove_duplicate=False)
            if p.device.type == "meta"
        ]


__all__ = ["BlockLoader"]
