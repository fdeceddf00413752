"""Writing a checkpoint tensor by tensor, a few shards at a time, into a hidden sibling folder
marked partial until `finish` names the shards the Hugging Face way and renames the folder
into place: an interrupted run never leaves a folder that looks like a finished model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import torch

from .checkpoint import open_checkpoint
from .shards import INDEX_FILE, SINGLE_FILE, TORCH_TO_SAFETENSORS, open_safetensors

PARTIAL = "PARTIAL"
DEFAULT_SHARD_BYTES = 5 * 2**30


def tensor_digest(t: torch.Tensor) -> str:
    """A hash of a tensor's dtype, shape and bytes (to check what reached the disk)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write contiguous CPU `tensors` as one safetensors file, tensor by tensor from their
    own memory (the format: an 8-byte little-endian header length, a JSON header of dtypes,
    shapes and byte ranges padded to 8 bytes, then the bytes in that order), so writing a
    shard takes no second copy of it."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in TORCH_TO_SAFETENSORS:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": TORCH_TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def check_output(out_dir: str | Path, source_dir: str | Path | None = None) -> Path:
    """The resolved `out_dir`, refused (`ValueError`) when it is the source checkpoint folder or
    inside it, or when it exists and is a file or a non-empty folder."""
    out = Path(out_dir).expanduser().resolve()
    if source_dir is not None:
        src = Path(source_dir).expanduser().resolve()
        if out == src or src in out.parents:
            raise ValueError(
                f"output folder {str(out_dir)!r} is (inside) the source checkpoint {str(src)!r}: "
                "writing there could overwrite the shards being read"
            )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {str(out_dir)!r} exists and is not empty")
    return out


def _save_pretrained(obj, folder: Path, what: str) -> None:
    """`obj.save_pretrained(folder)`; a failure of any kind (tokenizers raise plain
    `Exception`s, e.g. on a full disk) becomes an `OSError` naming what was being saved."""
    try:
        obj.save_pretrained(str(folder))
    except (OSError, ValueError):
        raise
    except Exception as e:
        raise OSError(f"saving the {what} failed: {type(e).__name__}: {e}") from e


def stale_partials(out_dir: str | Path) -> list[Path]:
    """Folders that earlier writes of `out_dir` left beside it, abandoned or interrupted
    (`.<name>.partial-*`, each with its `PARTIAL` marker)."""
    out = Path(out_dir).expanduser().resolve()
    if not out.parent.is_dir():
        return []
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def _usual_permissions(folder: Path) -> None:
    """The folder and its files get the modes `mkdir` / `open` would give under the umask
    (the temporary folder and safetensors' files are created private)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


class CheckpointWriter:
    """`with CheckpointWriter(out_dir) as w: w.add(name, tensor) ...; w.finish(config)`.

    Tensors are copied to contiguous CPU tensors and buffered; a shard is written as soon as
    the next tensor would take the buffer past `max_shard_bytes` (a single bigger tensor gets a
    shard of its own). Everything goes to `.<out_dir name>.partial-<pid>-*` beside `out_dir`,
    which holds a `PARTIAL` json marker until `finish`; an exception (KeyboardInterrupt too)
    inside the `with` leaves that folder, its marker saying why. `digests`: hash every tensor
    added (`self.digests`, for `verify_streamed`; costs a pass over the bytes)."""

    def __init__(
        self,
        out_dir: str | Path,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        source_dir: str | Path | None = None,
        digests: bool = True,
    ):
        if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        self.out_dir = check_output(out_dir, source_dir)
        self.max_shard_bytes = max_shard_bytes
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(
            tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-{os.getpid()}-",
                             dir=self.out_dir.parent)
        )  # fmt: skip
        self.digests: dict[str, str] = {}  # name -> tensor_digest, for verify_streamed
        self._hash = digests
        self._names: set[str] = set()
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: list[tuple[str, list[str], int]] = []  # (temporary file, names, bytes)
        self._finished = False
        try:
            self._mark("writing")
        except BaseException as e:  # not even the marker fits (or an interrupt): leave nothing
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            if isinstance(e, OSError):
                raise OSError(f"cannot write beside {str(self.out_dir)!r}: {e}") from e
            raise

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abandon(f"{exc_type.__name__}: {exc}")
        elif not self._finished:
            self._abandon("the writer was closed without finish()")

    # ---------------------------------------------------------------------- state

    @property
    def written_bytes(self) -> int:
        return sum(n for _, _, n in self._shards)

    def _mark(self, status: str, reason: str | None = None) -> None:
        info = {
            "partial": True,
            "status": status,
            "reason": reason,
            "out_dir": str(self.out_dir),
            "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "shards_written": [f for f, _, _ in self._shards],
            "tensors_written": [n for _, names, _ in self._shards for n in names],
            "tensors_buffered_not_written": list(self._buffer),
            "bytes_written": self.written_bytes,
        }
        # a temporary file renamed over the marker: the marker on disk always holds a whole
        # status and reason, the last one that could be written (a full disk, an interrupt)
        tmp = self.tmp_dir / f".{PARTIAL}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(info, indent=1))
            os.replace(tmp, self.tmp_dir / PARTIAL)
        finally:
            tmp.unlink(missing_ok=True)

    def _abandon(self, reason: str) -> None:
        self._buffer.clear()
        self._buffered = 0
        if self.tmp_dir.is_dir():
            with contextlib.suppress(OSError):  # the last marker written stays whole
                self._mark("abandoned", reason)

    # ---------------------------------------------------------------------- writing

    def add(self, name: str, tensor: torch.Tensor, copy: bool = True) -> None:
        """Buffer a copy of `tensor` under `name`; writes a shard when the buffer is full.
        `copy=False` buffers a CPU tensor as it is (contiguous), for a caller that flushes
        before changing or freeing it."""
        if self._finished:
            raise ValueError(f"add({name!r}): the writer has already finished")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"add({name!r}): expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type == "meta":
            raise ValueError(f"add({name!r}): the tensor is on the meta device (not loaded)")
        if name in self._names:
            raise ValueError(f"add({name!r}): a tensor of that name was already added")
        t = tensor.detach().to("cpu", copy=copy).contiguous()
        size = t.numel() * t.element_size()
        if self._buffer and self._buffered + size > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = t
        self._buffered += size
        self._names.add(name)
        if self._hash:
            self.digests[name] = tensor_digest(t)
        if self._buffered >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered tensors as one shard now (nothing if the buffer is empty)."""
        if not self._buffer:
            return
        fname = f"shard-{len(self._shards) + 1:05d}.safetensors"
        write_safetensors(self.tmp_dir / fname, self._buffer)
        self._shards.append((fname, list(self._buffer), self._buffered))
        self._buffer = {}
        self._buffered = 0
        self._mark("writing")

    def finish(
        self,
        config,
        tokenizer=None,
        generation_config=None,
        extra_files: Mapping[str, str] | None = None,
        config_entries: Mapping[str, object] | None = None,
    ) -> Path:
        """Write the last shard, name the shards `model-0000K-of-0000N.safetensors` (one:
        `model.safetensors`) with the index, save `config` / `generation_config` / `tokenizer`
        (`save_pretrained`; `config_entries` added to config.json: a quantized checkpoint's
        `quantization_config`) and `extra_files` ({file name: text}), remove the marker and
        rename the folder to `out_dir`. Returns `out_dir`."""
        if self._finished:
            raise ValueError("finish(): the writer has already finished")
        extra = dict(extra_files or {})
        for fname in extra:
            if not isinstance(fname, str) or Path(fname).name != fname or fname == PARTIAL:
                raise ValueError(f"extra_files: {fname!r} is not a plain file name")
        try:
            self.flush()
            if not self._shards:
                raise ValueError("finish(): no tensor was added")
            n = len(self._shards)
            weight_map = {}
            for i, (tmp_name, names, _) in enumerate(self._shards, start=1):
                final = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
                (self.tmp_dir / tmp_name).rename(self.tmp_dir / final)
                weight_map.update(dict.fromkeys(names, final))
            if n > 1:
                index = {"metadata": {"total_size": self.written_bytes}, "weight_map": weight_map}
                (self.tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            for what, obj in (
                ("config", config),
                ("generation config", generation_config),
                ("tokenizer", tokenizer),
            ):
                if obj is not None:
                    _save_pretrained(obj, self.tmp_dir, what)
            if config_entries:
                config_file = self.tmp_dir / "config.json"
                data = json.loads(config_file.read_text())
                data.update(config_entries)
                config_file.write_text(json.dumps(data, indent=2, sort_keys=True))
            for fname, text in extra.items():
                if (self.tmp_dir / fname).exists():
                    raise ValueError(f"extra_files: {fname!r} would overwrite a file written")
                (self.tmp_dir / fname).write_text(text)
            check_output(self.out_dir)  # something may have appeared there meanwhile
            (self.tmp_dir / PARTIAL).unlink()
            _usual_permissions(self.tmp_dir)
            if self.out_dir.is_dir():
                self.out_dir.rmdir()  # empty, checked above
            self.tmp_dir.rename(self.out_dir)
        except BaseException as e:
            if self.tmp_dir.is_dir():
                with contextlib.suppress(OSError):
                    self._mark("abandoned", f"finish() failed: {type(e).__name__}: {e}")
            raise
        self._finished = True
        return self.out_dir

    def discard(self) -> None:
        """Delete the temporary folder (after an abandoned write, when it is not wanted)."""
        if not self._finished and self.tmp_dir.is_dir():
            shutil.rmtree(self.tmp_dir)


@torch.no_grad()
def verify_streamed(
    out_dir: str | Path, digests: Mapping[str, str] | None = None, check_model: bool = True
) -> dict:
    """Check a written checkpoint without loading it whole: the index and every shard header
    agree (`open_checkpoint`), the config's model matches the tensors' names and shapes
    (`check_model` on its skeleton), and, given the writer's `digests`, every tensor read back
    one at a time hashes to what was added. Raises `ValueError` on a mismatch."""
    ckpt = open_checkpoint(out_dir)
    if check_model:
        ckpt.skeleton()
    out = {"tensors": len(ckpt.tensors), "shards": len(ckpt.shards), "bytes": ckpt.nbytes}
    if digests is None:
        return out
    if set(digests) != set(ckpt.tensors):
        extra = sorted(set(ckpt.tensors) - set(digests))
        lost = sorted(set(digests) - set(ckpt.tensors))
        raise ValueError(
            f"{out_dir}: tensors written {lost[:3]} are missing; tensors not written "
            f"{extra[:3]} are present"
        )
    for shard in ckpt.shards:
        with open_safetensors(ckpt.path / shard) as f:
            names = f.keys()
            for k in names:
                if k in digests and tensor_digest(f.get_tensor(k)) != digests[k]:
                    raise ValueError(
                        f"{out_dir}: tensor {k!r} in {shard} differs from what was added"
                    )
    out["verified"] = len(digests)
    return out
