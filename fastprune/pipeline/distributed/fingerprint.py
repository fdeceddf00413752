"""What every rank must agree on before a distributed prune, and the message naming what
differs."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from ...version import __version__


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _sample_bytes(t: torch.Tensor, count: int = 4096) -> bytes:
    """The bytes of up to `count` evenly strided elements of `t` (as float64 for floats)."""
    if t.device.type == "meta" or t.numel() == 0:
        return b""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // count)
    s = flat[::step][:count]
    s = s.to(torch.float64) if s.is_floating_point() else s.to(torch.int64)
    return s.cpu().numpy().tobytes()


def weights_checksum(model: nn.Module) -> str:
    """A cheap checksum of a model's parameters: names, shapes, dtypes and a strided sample
    of each one's values (two replicas of one checkpoint agree; different weights almost
    surely differ)."""
    h = hashlib.blake2b(digest_size=8)
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(_sample_bytes(p))
    return h.hexdigest()


def _config_digest(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    d = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and k != "name_or_path"}
    return _digest(json.dumps(d, sort_keys=True, default=str).encode())


def _value(x):
    """A comparable, printable stand-in for an option value (tensors and dicts of tensors
    by checksum)."""
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)} {_digest(_sample_bytes(x, 1 << 16))}"
    if isinstance(x, dict):
        return {str(k): _value(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, list | tuple):
        return [_value(v) for v in x]
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return repr(x)


def fingerprint(model: nn.Module, calib: torch.Tensor | None, **fields) -> dict:
    """What every rank must agree on before a distributed prune: the model (class, config,
    parameter count, `weights_checksum`), the calibration tokens (shape and checksum) and
    `fields` (method, sparsity, options, ...), plus the fastprune and torch versions."""
    fp = {
        "model class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model config": _config_digest(model),
        "parameter count": sum(p.numel() for p in model.parameters()),
        "weights checksum": weights_checksum(model),
        "calibration shape": None if calib is None else tuple(calib.shape),
        "calibration tokens checksum": (
            None if calib is None else _digest(calib.detach().cpu().numpy().tobytes())
        ),
    }
    fp.update({k: _value(v) for k, v in fields.items()})
    fp["fastprune version"] = __version__
    fp["torch version"] = torch.__version__
    return fp


def _short(v, width: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= width else s[: width - 3] + "..."


def _ranks(rs: list[int]) -> str:
    return ("rank " if len(rs) == 1 else "ranks ") + ", ".join(map(str, rs))


def disagreement(fingerprints: list[dict]) -> str | None:
    """None when every rank's fingerprint is the same, else a message naming the first
    differing field, each value with the ranks that have it, and any other differing
    fields."""
    keys = list(dict.fromkeys(k for f in fingerprints for k in f))
    bad = [k for k in keys if any(f.get(k) != fingerprints[0].get(k) for f in fingerprints)]
    if not bad:
        return None
    k = bad[0]
    by_value: dict[str, list[int]] = {}
    for r, f in enumerate(fingerprints):
        by_value.setdefault(_short(f.get(k)), []).append(r)
    parts = "; ".join(f"{_ranks(rs)}: {v}" for v, rs in by_value.items())
    more = f" (also differ: {', '.join(bad[1:])})" if len(bad) > 1 else ""
    return (
        f"ranks disagree on {k}: {parts}{more}. Every rank must prune the same model with the "
        "same arguments and calibration data"
    )


# ---------------------------------------------------------------------------------- Comm
