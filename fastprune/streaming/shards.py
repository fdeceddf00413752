"""A checkpoint folder's files: `config.json`, one safetensors file or an index and its
shards, whose headers are read and checked (shard names, tensor names, dtypes) before any
tensor is, so that a damaged checkpoint is refused naming the file at fault."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import CONFIG_FILE

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype name -> (torch dtype, bytes per element); the float ones are loadable
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype | None, float]] = {
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
FLOAT_NAMES = tuple(
    name for name, (dt, _) in SAFETENSORS_DTYPES.items() if dt is not None and dt.is_floating_point
)
# torch dtype -> safetensors dtype name, for the ones torch has (float8 e4m3: the codes of
# an FP8-quantized checkpoint, written but never a model's own dtype)
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {
    dt: name for name, (dt, _) in SAFETENSORS_DTYPES.items() if dt is not None
}
if hasattr(torch, "float8_e4m3fn"):
    TORCH_TO_SAFETENSORS[torch.float8_e4m3fn] = "F8_E4M3"


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
        return int(self.numel * SAFETENSORS_DTYPES[self.dtype][1])


def open_safetensors(path: Path):
    """`path` opened for reading tensors onto the CPU (safetensors is imported only here)."""
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes in one safetensors file's header (no tensor data read)."""
    try:
        with open_safetensors(path) as f:
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


def read_folder(path: str | Path) -> tuple[Path, dict, dict[str, TensorInfo]]:
    """`(folder, config dict, tensor name -> TensorInfo)` of a local Hugging Face checkpoint
    folder (`config.json` and `model.safetensors`, or `model.safetensors.index.json` and its
    shards), reading only the json and shard headers. Raises `ValueError` naming the file or
    tensor when anything is missing or inconsistent."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is not a folder")
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise ValueError(f"checkpoint {folder} has no {CONFIG_FILE}")
    cfg = _read_json(cfg_file)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file} is not a json object")
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.is_file():
        tensors = {k: TensorInfo(SINGLE_FILE, *v) for k, v in read_header(single).items()}
    elif index.is_file():
        tensors = _indexed_tensors(folder, index)
    else:
        raise ValueError(f"checkpoint {folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    for k, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {k!r} in {t.shard} has unknown safetensors dtype {t.dtype}")
    return folder, cfg, tensors


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot parse {path}: {e}") from e


def _indexed_tensors(folder: Path, index: Path) -> dict[str, TensorInfo]:
    """The tensors an index file names, each checked against its shard's header."""
    data = _read_json(index)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise ValueError(f"{index} has no 'weight_map' object of tensor name -> shard file")
    by_shard: dict[str, list[str]] = {}
    for k, shard in wmap.items():
        _check_shard_name(shard, index, k)
        by_shard.setdefault(shard, []).append(k)
    tensors: dict[str, TensorInfo] = {}
    for shard, keys in sorted(by_shard.items()):
        f = folder / shard
        if not f.is_file():
            raise ValueError(
                f"shard {shard!r} named by {index.name} (for tensor {keys[0]!r} and "
                f"{len(keys) - 1} more) is missing from {folder}"
            )
        header = read_header(f)
        for k in keys:
            if k not in header:
                raise ValueError(
                    f"{index.name} puts tensor {k!r} in shard {shard!r}, whose header does "
                    "not hold it"
                )
            tensors[k] = TensorInfo(shard, *header[k])
    return tensors


__all__ = [
    "CONFIG_FILE",
    "FLOAT_NAMES",
    "INDEX_FILE",
    "SAFETENSORS_DTYPES",
    "SINGLE_FILE",
    "TORCH_TO_SAFETENSORS",
    "TensorInfo",
    "open_safetensors",
    "read_folder",
    "read_header",
]
