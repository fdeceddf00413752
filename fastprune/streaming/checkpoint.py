"""Reading a safetensors checkpoint piece by piece: a model skeleton whose parameters live on
the meta device, then one module's tensors at a time read from the shards and released again,
so a model larger than host memory can be pruned block by block.

Everything that can be checked from `config.json`, the index and the shard headers is checked
when the checkpoint is opened (`shards`) or the skeleton matched against it (`layout`), before
any tensor is read; the loading itself is `loader`'s. Every name is importable from here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from .compressed import scheme_args
from .layout import Source, match_model, resolve_source
from .loader import BlockLoader
from .memory import available_host_memory, params_on_meta
from .shards import (
    CONFIG_FILE,
    FLOAT_NAMES,
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    SINGLE_FILE,
    TensorInfo,
    open_safetensors,
    read_folder,
    read_header,
)


class Checkpoint(BlockLoader):
    """An opened checkpoint folder: its config, and for every tensor the shard holding it with
        its shape and dtype (from the headers); the skeleton built from the config, and its modules
    loaded and released one at a time (`BlockLoader`). Use `open_checkpoint` to make one."""

    def __init__(self, path: Path, config_dict: dict, tensors: dict[str, TensorInfo]):
        super().__init__(path, tensors, scheme_args(config_dict))
        self.config_dict = config_dict

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
            raise ValueError(f"cannot build a config from {self.path / CONFIG_FILE}: {e}") from e

    def stored_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the checkpoint's bytes."""
        by: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in FLOAT_NAMES:
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        if not by:
            raise ValueError(f"checkpoint {self.path} holds no floating-point tensors")
        return SAFETENSORS_DTYPES[max(by, key=by.get)][0]

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


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a local Hugging Face checkpoint folder (`config.json` and `model.safetensors`, or
    `model.safetensors.index.json` and its shards), reading only the json and shard headers.
    Raises `ValueError` naming the file or tensor when anything is missing or inconsistent."""
    return Checkpoint(*read_folder(path))


__all__ = [
    "CONFIG_FILE",
    "FLOAT_NAMES",
    "INDEX_FILE",
    "SAFETENSORS_DTYPES",
    "SINGLE_FILE",
    "BlockLoader",
    "Checkpoint",
    "Source",
    "TensorInfo",
    "available_host_memory",
    "match_model",
    "open_checkpoint",
    "open_safetensors",
    "params_on_meta",
    "read_header",
    "resolve_source",
]
