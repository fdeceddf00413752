"""Reading a safetensors checkpoint piece by piece: a model skeleton whose parameters live on
the meta device, then one module's tensors at a time read from the shards and released again,
so a model larger than host memory can be pruned block by block.

Everything that can be checked from `config.json`, the index and the shard headers is checked
when the checkpoint is opened or the skeleton matched against it, before any tensor is read.
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype name -> (torch dtype, bytes per element); the float ones are loadable
_DTYPES: dict[str, tuple[torch.dtype | None, float]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "U16": (None, 2),
    "U32": (None, 4),
    "U64": (None, 8),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (None, 1),
    "F8_E5M2": (None, 1),
    "F8_E8M0": (None, 1),
    "F4": (None, 0.5),
}
_FLOAT_NAMES = ("F64", "F32", "F16", "BF16")

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
class TensorInfo:
    """One tensor of the checkpoint as its shard header describes it."""

    shard: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: "BF16", "F32", ...

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return int(self.numel * _DTYPES[self.dtype][1])


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


def available_host_memory() -> int:
    """Bytes of host memory available to a new allocation (psutil, else /proc/meminfo)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency in practice
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the available host memory (no psutil, no MemAvailable)")


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to the meta device right away;
    buffers stay real, so values computed in `__init__` (rotary `inv_freq`) are correct.
    A parameter is allocated only for the moment it is registered (never initialised)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _safe_open(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes in one safetensors file's header (no tensor data read)."""
    try:
        with _safe_open(path) as f:
            out = {}
            names = f.keys()
            for k in names:
                s = f.get_slice(k)
                out[k] = (tuple(int(d) for d in s.get_shape()), str(s.get_dtype()))
            return out
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise ValueError(f"cannot read the safetensors header of {path}: {e}") from e


def _check_shard_name(shard: object, index: Path, key: str) -> None:
    if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in ("..", "."):
        raise ValueError(
            f"{index} maps tensor {key!r} to {shard!r}, not a plain file name in the "
            "checkpoint folder"
        )


class Checkpoint:
    """An opened checkpoint folder: its config, and for every tensor the shard holding it with
    its shape and dtype (from the headers). Use `open_checkpoint` to make one."""

    def __init__(self, path: Path, config_dict: dict, tensors: dict[str, TensorInfo]):
        self.path = path
        self.config_dict = config_dict
        self.tensors = tensors
        self._plan: dict[str, Source] = {}
        self._ties: dict[str, tuple[str, ...]] = {}
        self._root: weakref.ref | None = None

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors in "
            f"{len(self.shards)} shard(s), {self.nbytes / 2**30:.2f} GiB)"
        )

    @property
    def shards(self) -> list[str]:
        return sorted({t.shard for t in self.tensors.values()})

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint (from the headers)."""
        return sum(t.nbytes for t in self.tensors.values())

    def identity(self) -> str:
        """A digest of the config and every tensor's name, shape, dtype and shard (what ranks
        streaming the same checkpoint agree on, without reading the weights)."""
        import hashlib

        h = hashlib.blake2b(digest_size=8)
        h.update(json.dumps(self.config_dict, sort_keys=True, default=str).encode())
        for k in sorted(self.tensors):
            t = self.tensors[k]
            h.update(f"{k}:{t.shard}:{t.shape}:{t.dtype};".encode())
        return h.hexdigest()

    def fits_in_memory(self, margin: float = 1.25, dtype: torch.dtype | None = None) -> bool:
        """Whether the whole model (times `margin`) fits in the available host memory, loaded
        in `dtype` (default: as stored); False means: stream it block by block."""
        need = self.nbytes
        if dtype is not None:
            size = torch.empty((), dtype=dtype).element_size()
            need = sum(t.numel * size for t in self.tensors.values())
        return need * margin <= available_host_memory()

    # ---------------------------------------------------------------------- the skeleton

    def config(self):
        """A fresh transformers config read from `config.json`."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self.path))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot build a config from {self.path / 'config.json'}: {e}") from e

    def stored_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the checkpoint's bytes."""
        by: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in _FLOAT_NAMES:
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        if not by:
            raise ValueError(f"checkpoint {self.path} holds no floating-point tensors")
        return _DTYPES[max(by, key=by.get)][0]

    def skeleton(self, dtype: torch.dtype | None = None) -> nn.Module:
        """`AutoModelForCausalLM` from the config, in eval mode, every parameter on the meta
        device (in `dtype`, default the checkpoint's), buffers real, tied weights tied; checked
        against the checkpoint (`check_model`) before it is returned."""
        from transformers import AutoModelForCausalLM

        from ..models import dtype_kwarg

        cfg = self.config()
        dtype = dtype if dtype is not None else self.stored_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype!r} is not a floating torch dtype")
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(cfg, **{dtype_kwarg(): dtype})
        model.eval()
        self.check_model(model)
        return model

    # ---------------------------------------------------------------------- matching

    def _resolve(self, name: str, shape: tuple[int, ...]) -> Source | None:
        """The checkpoint tensors of model tensor `name`: as it is, renamed, or per-expert."""
        if name in self.tensors:
            return Source(((name,),))
        for new, old in _RENAMES:
            alt = name.replace(new, old)
            if new in name and alt in self.tensors:
                return Source(((alt,),))
        base, _, leaf = name.rpartition(".")
        if (
            len(shape) != 3
            or not base.endswith("experts")
            or leaf not in ("gate_up_proj", "down_proj")
        ):
            return None
        bases = [base] + [base.replace(n, o) for n, o in _RENAMES if n in base]
        for b in bases:
            for gate, up, down in _EXPERT_NAMES:
                parts = (gate, up) if leaf == "gate_up_proj" else (down,)
                groups = tuple(tuple(f"{b}.{e}.{p}.weight" for e in range(shape[0])) for p in parts)
                if all(k in self.tensors for g in groups for k in g):
                    return Source(groups)
        return None

    def check_model(self, model: nn.Module) -> None:
        """Match `model` (usually `skeleton()`) against the checkpoint: every parameter has its
        tensor(s), of its shape and a floating dtype (a tied head may be absent); every
        checkpoint tensor feeds a parameter or persistent buffer. Raises `ValueError` naming
        the first mismatch. Remembers the match for `load` and the model's tied weights."""
        ignore = [
            re.compile(p)
            for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        ]
        by_id: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        plan: dict[str, Source] = {}
        missing: list[str] = []
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        for names in by_id.values():
            found = {n: self._resolve(n, shapes[n]) for n in names}
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
            if name in self.tensors:
                plan[name] = Source(((name,),))
        used = {k for s in plan.values() for k in s.keys}
        unused = [k for k in self.tensors if k not in used and not any(r.search(k) for r in ignore)]
        cls = type(model).__name__
        if missing:
            hint = f"; the checkpoint has {unused[0]!r}, which matches nothing" if unused else ""
            raise ValueError(
                f"checkpoint {self.path} has no tensor for {cls} parameter {missing[0]!r} "
                f"(shape {list(shapes[missing[0]])}){hint}: a layout whose names need a "
                "conversion fastprune does not support, or a checkpoint of another model"
            )
        if unused:
            raise ValueError(
                f"checkpoint tensor {unused[0]!r} (shape {list(self.tensors[unused[0]].shape)}) "
                f"maps to no parameter or persistent buffer of {cls}: its names need a "
                "conversion fastprune does not support, or it belongs to another model"
            )
        for name, src in plan.items():
            for k in src.keys:
                dt = self.tensors[k].dtype
                want_float = name not in buffers or buffers[name].is_floating_point()
                if want_float and dt not in _FLOAT_NAMES:
                    raise ValueError(
                        f"checkpoint tensor {k!r} has dtype {dt}; {cls} {name!r} expects a "
                        f"floating dtype ({', '.join(_FLOAT_NAMES)})"
                    )
            got = src.shape(self.tensors)
            want = shapes[name] if name in shapes else tuple(buffers[name].shape)
            if got != want:
                pieces = (
                    f"checkpoint tensor {src.keys[0]!r} has shape "
                    f"{list(self.tensors[src.keys[0]].shape)}"
                    if src.direct
                    else f"its {len(src.keys)} per-expert tensors ({src.keys[0]!r}, ...) do not "
                    f"stack to it (got {None if got is None else list(got)})"
                )
                raise ValueError(f"{cls} {name!r} expects shape {list(want)}; {pieces}")
        self._plan = plan
        self._ties = {n: tuple(names) for names in by_id.values() if len(names) > 1 for n in names}
        self._root = weakref.ref(model)

    # ---------------------------------------------------------------------- load / release

    def source(self, name: str, shape: Sequence[int] | None = None) -> Source:
        """Where model tensor `name` (full name) comes from in the checkpoint."""
        src = self._plan.get(name)
        if src is None and shape is not None:
            src = self._resolve(name, tuple(shape))
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
        root = self._root() if self._root is not None else None
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
        root = self._root() if self._root is not None else None
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
            with _safe_open(self.path / shard) as f:
                for k in keys:
                    read[k] = f.get_tensor(k)
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
        root = self._root() if self._root is not None else None
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

    def module_tensors(
        self, module: nn.Module, prefix: str = "", skip: Iterable[str] = ()
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """`module`'s loaded parameters and the persistent buffers the checkpoint holds, as
        the checkpoint stores them: (checkpoint key, tensor) pairs, per expert where it keeps
        experts apart, each key once (a tied weight is written where it is stored). Names
        under a prefix in `skip` are left out. For writing a pruned module in place of its
        source tensors."""
        skip = tuple(s.rstrip(".") + "." for s in skip)
        seen: set[str] = set()
        for name, m, attr, kind in self._slots(module, prefix):
            if skip and any(name.startswith(s) for s in skip):
                continue
            if kind == "buffer" and name not in self._plan and name not in self.tensors:
                continue
            t = getattr(m, attr)
            if t.device.type == "meta":
                raise ValueError(f"{name} is not loaded (on the meta device): nothing to write")
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


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a local Hugging Face checkpoint folder (`config.json` and `model.safetensors`, or
    `model.safetensors.index.json` and its shards), reading only the json and shard headers.
    Raises `ValueError` naming the file or tensor when anything is missing or inconsistent."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is not a folder")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"checkpoint {folder} has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot parse {cfg_file}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file} is not a json object")
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    tensors: dict[str, TensorInfo] = {}
    if single.is_file():
        for k, (shape, dt) in _read_header(single).items():
            tensors[k] = TensorInfo(SINGLE_FILE, shape, dt)
    elif index.is_file():
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot parse {index}: {e}") from e
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ValueError(f"{index} has no 'weight_map' object of tensor name -> shard file")
        by_shard: dict[str, list[str]] = {}
        for k, shard in wmap.items():
            _check_shard_name(shard, index, k)
            by_shard.setdefault(shard, []).append(k)
        for shard, keys in sorted(by_shard.items()):
            f = folder / shard
            if not f.is_file():
                raise ValueError(
                    f"shard {shard!r} named by {index.name} (for tensor {keys[0]!r} and "
                    f"{len(keys) - 1} more) is missing from {folder}"
                )
            header = _read_header(f)
            for k in keys:
                if k not in header:
                    raise ValueError(
                        f"{index.name} puts tensor {k!r} in shard {shard!r}, whose header does "
                        "not hold it"
                    )
                tensors[k] = TensorInfo(shard, *header[k])
    else:
        raise ValueError(f"checkpoint {folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    for k, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"tensor {k!r} in {t.shard} has unknown safetensors dtype {t.dtype}")
    return Checkpoint(folder, cfg, tensors)
