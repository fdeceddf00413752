"""Weight quantization grids: GPTQ's integer grid (symmetric or asymmetric, per group of
columns or per output channel) and FP8 e4m3, as the OBS sweep rounds kept weights to them.

`QuantSpec` says which grid; `find_params` finds a row's grid over a group of columns exactly
as GPTQ's `Quantizer.find_params(weight=True)`; `quantize` rounds to it, `codes` gives the
integer codes; `QuantizedWeight` is what a quantized layer carries (`PruneResult.quant`);
`round_to_nearest` is the baseline without a Hessian (RTN).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .validation import check_bool, check_weight

FORMATS = ("int", "fp8")
PARAMS = ("sweep", "static")
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def has_fp8() -> bool:
    """Whether this torch has the float8 e4m3 dtype the "fp8" format rounds through."""
    return hasattr(torch, "float8_e4m3fn")


@dataclass(frozen=True)
class QuantSpec:
    """Which grid the kept weights are rounded to.

    bits: integer grid of `2**bits` levels, 2..8 (ignored by fp8). group_size: columns per
    group (None: one group per output channel). sym: symmetric grid (GPTQ's zero point
    `(maxq + 1) / 2`). actorder: columns swept by decreasing diag(H). format: "int" or "fp8"
    (float8 e4m3, per-channel scales, no zero point). params: "sweep" finds a group's grid
    from the updated weights when the sweep reaches its first column (GPTQ); "static" finds
    every grid once from W before the sweep (SparseGPT's --wbits, llm-compressor's GPTQ).
    """

    bits: int = 4
    group_size: int | None = 128
    sym: bool = True
    actorder: bool = False
    format: str = "int"
    params: str = "sweep"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.params not in PARAMS:
            raise ValueError(f"params must be one of {PARAMS}, got {self.params!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, numbers.Integral):
            raise TypeError(f"bits must be an int in [2, 8], got {self.bits!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits!r}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, numbers.Integral)):
            raise TypeError(f"group_size must be a positive int or None, got {gs!r}")
        if gs is not None and gs < 1:
            raise ValueError(f"group_size must be a positive int or None, got {gs!r}")
        check_bool(self.sym, "sym")
        check_bool(self.actorder, "actorder")
        if self.format == "fp8":
            if not has_fp8():
                raise ValueError(
                    "format='fp8' needs torch.float8_e4m3fn, which this torch "
                    f"({torch.__version__}) lacks"
                )
            if gs is not None:
                raise ValueError(
                    f"group_size must be None for format='fp8' (per-channel scales), got {gs!r}"
                )

    @classmethod
    def preset(cls, name: str) -> QuantSpec:
        """ "w4a16" (int4, groups of 128, symmetric), "w8a16" (int8 per channel, symmetric),
        "fp8" (float8 e4m3 per channel)."""
        presets = {
            "w4a16": dict(bits=4, group_size=128, sym=True),
            "w8a16": dict(bits=8, group_size=None, sym=True),
            "fp8": dict(bits=8, group_size=None, sym=True, format="fp8"),
        }
        if name not in presets:
            raise ValueError(f"quant preset must be one of {tuple(presets)}, got {name!r}")
        return cls(**presets[name])

    @property
    def maxq(self) -> int:
        """The largest integer code, `2**bits - 1`."""
        return 2**self.bits - 1

    @property
    def fp8(self) -> bool:
        return self.format == "fp8"

    def as_info(self) -> dict:
        """The spec as a result's `info["quant"]` records it (without the grid error)."""
        return {
            "bits": 8 if self.fp8 else self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "format": self.format,
            "actorder": self.actorder,
            "params": self.params,
        }


def as_spec(quant: object, name: str = "quant") -> QuantSpec | None:
    """None, a `QuantSpec`, or a preset name (`QuantSpec.preset`) as a `QuantSpec`."""
    if quant is None or isinstance(quant, QuantSpec):
        return quant
    if isinstance(quant, str):
        return QuantSpec.preset(quant)
    raise TypeError(f"{name} must be a QuantSpec, a preset name or None, got {quant!r}")


def find_params(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's grid over its columns, `W [.., rows, g]` -> `(scale, zero)` `[.., rows]` in
    W's dtype: GPTQ's `find_params(weight=True)` (the range always holds 0; an all-zero row
    gets [-1, 1]); fp8: `scale = max|w| / 448` (1 for a zero row) and zero 0."""
    if spec.fp8:
        amax = W.abs().amax(-1)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        return scale, torch.zeros_like(scale)
    zeros = torch.zeros(W.shape[:-1], dtype=W.dtype, device=W.device)
    xmin = torch.minimum(W.amin(-1), zeros)
    xmax = torch.maximum(W.amax(-1), zeros)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / spec.maxq
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def _grid(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A row's grid parameter `[.., rows]` against `w [.., rows, k]`, or `t` as it is."""
    return t.unsqueeze(-1) if t.dim() == w.dim() - 1 else t


def codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec):
    """The codes of `w` on the grid: `clamp(round(w / scale) + zero, 0, maxq)` in w's dtype
    (integer-valued); fp8: `w / scale` as float8_e4m3fn values. `scale`/`zero` are `[.., rows]`
    (a row's grid over all of w's columns) or w's shape."""
    scale, zero = _grid(w, scale), _grid(w, zero)
    if spec.fp8:
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch.clamp(torch.round(w / scale) + zero, 0, spec.maxq)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec):
    """`w` rounded to the grid, in w's dtype: `scale * (codes - zero)` (a 0 stays exactly 0);
    fp8: `float8(w / scale) * scale` (round to nearest even)."""
    c = codes(w, scale, zero, spec)
    if spec.fp8:
        return c.to(w.dtype) * _grid(w, scale)
    return _grid(w, scale) * (c - _grid(w, zero))


@dataclass
class QuantizedWeight:
    """A quantized layer: `codes [rows, cols]` (uint8 in [0, maxq]; fp8: float8_e4m3fn),
    `scale [rows, n_groups]` float32, `zero [rows, n_groups]` int32 (None for fp8), `g_idx
    [cols]` int32, each input column's group (None: `column // group_size`)."""

    spec: QuantSpec
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None = None

    def groups(self) -> torch.Tensor:
        """Each input column's group, `[cols]` (int64)."""
        cols = self.codes.shape[-1]
        if self.g_idx is not None:
            return self.g_idx.long()
        gs = self.spec.group_size
        idx = torch.arange(cols, device=self.codes.device)
        return idx // gs if gs is not None else torch.zeros_like(idx)

    def dequantize(self) -> torch.Tensor:
        """`[rows, cols]` float32: `scale[:, g] * (codes - zero[:, g])` (pruned weights: 0)."""
        g = self.groups()
        scale = self.scale.float()[:, g]
        if self.zero is None:
            return self.codes.float() * scale
        return scale * (self.codes.float() - self.zero.float()[:, g])

    def nbytes(self) -> int:
        """Bytes as packed on disk: integer codes packed into int32 words (`32 // bits` codes
        each: int4 two codes per byte, int8 one), fp8 one byte a weight; float32 scales,
        asymmetric zero points packed as the codes (along rows), the int32 g_idx."""
        rows, cols = self.codes.shape
        groups = self.scale.shape[-1]
        if self.spec.fp8:
            total = rows * cols
        else:
            per_word = 32 // self.spec.bits
            total = rows * math.ceil(cols / per_word) * 4
            if self.zero is not None and not self.spec.sym:
                total += math.ceil(rows / per_word) * groups * 4
        total += self.scale.numel() * 4
        if self.g_idx is not None:
            total += self.g_idx.numel() * 4
        return total


def packed(
    spec: QuantSpec,
    Q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    g_idx: torch.Tensor | None = None,
) -> QuantizedWeight:
    """The `QuantizedWeight` of rounded weights `Q [rows, cols]` on the grids `scale`, `zero`
    `[rows, n_groups]` (group of column j: `g_idx[j]`, default `j // group_size`)."""
    g = g_idx.long() if g_idx is not None else None
    if g is None:
        gs = spec.group_size
        g = torch.arange(Q.shape[-1], device=Q.device)
        g = g // gs if gs is not None else torch.zeros_like(g)
    c = codes(Q, scale[:, g], zero[:, g], spec)
    if spec.fp8:
        return QuantizedWeight(spec, c, scale.float().contiguous(), None, g_idx)
    c = c.to(torch.uint8)
    z = zero.to(torch.int32).contiguous()
    gi = None if g_idx is None else g_idx.to(torch.int32)
    return QuantizedWeight(spec, c, scale.float().contiguous(), z, gi)


def group_bounds(cols: int, spec: QuantSpec) -> list[tuple[int, int]]:
    """`[(j1, j2), ...]` the column groups of a layer; the last may be shorter (GPTQ's)."""
    gs = spec.group_size or cols
    return [(j, min(j + gs, cols)) for j in range(0, cols, gs)]


def find_grids(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Every group's grid of `W [.., rows, cols]`, `(scale, zero)` `[.., rows, n_groups]`."""
    pairs = [find_params(W[..., j1:j2], spec) for j1, j2 in group_bounds(W.shape[-1], spec)]
    return torch.stack([s for s, _ in pairs], -1), torch.stack([z for _, z in pairs], -1)


def grid_error(W: torch.Tensor, Q: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Mean squared rounding error `|w - q|^2` over kept weights relative to `|w|^2`."""
    W, Q = W.double(), Q.double()
    if keep is not None:
        W, Q = W[keep], Q[keep]
    den = (W * W).sum().item()
    return (W - Q).pow(2).sum().item() / den if den > 0 else 0.0


def round_to_nearest(W: torch.Tensor, spec: QuantSpec | str) -> QuantizedWeight:
    """The RTN baseline: every group of `W [rows, cols]` rounded to its own grid found from W
    (no Hessian, no error feedback)."""
    W = check_weight(W)
    spec = as_spec(spec, "spec")
    if spec is None:
        raise TypeError("spec must be a QuantSpec or a preset name, got None")
    Wf = W.to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    scale, zero = find_grids(Wf, spec)
    g = torch.arange(W.shape[1], device=W.device) // (spec.group_size or W.shape[1])
    Q = quantize(Wf, scale[:, g], zero[:, g], spec)
    return packed(spec, Q, scale, zero)
