"""The compressed-tensors format of a quantized prune (the `compressed-tensors` package, which
transformers and vLLM load): each quantized linear as "pack-quantized" integer codes
(`weight_packed`, `weight_scale`, `weight_zero_point` for an asymmetric grid, `weight_shape`)
or "float-quantized" FP8 (`weight` in float8 e4m3, `weight_scale`), and config.json's
`quantization_config` naming the grid, the quantized linears (every other one ignored:
embeddings and the head stay as they are) and the sparsity of the prune; and such a linear
read back (`dequantized`) as the weight a runtime computes from it.

The codes written are fastprune's own (`QuantizedWeight.codes`, shifted to the package's
signed range), packed by the package's `pack_to_int32`; nothing is rounded again. Both the
in-memory save and the streamed writer write through here."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch
from torch import nn

MIN_VERSION = "0.20"  # the compressed-tensors this layout is tested with
PACKED, FLOAT = "pack-quantized", "float-quantized"


def missing_package() -> str | None:
    """Why a quantized checkpoint cannot be written here (None: it can)."""
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.compressors.pack_quantized.helpers import (  # noqa: F401
            pack_to_int32,
        )
    except ImportError:
        return (
            "saving a quantized model needs the compressed-tensors package: pip install "
            f"'compressed-tensors>={MIN_VERSION}' (or pip install 'fastprune[model]')"
        )
    return None


def scheme_of(spec, targets: list[str]):
    """The package's `QuantizationScheme` of a fastprune grid (`QuantSpec`) over `targets`."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if spec.fp8:
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
        return QuantizationScheme(targets=targets, weights=args, format=FLOAT)
    kw: dict[str, Any] = dict(num_bits=spec.bits, type="int", symmetric=spec.sym)
    if spec.group_size is None:
        kw["strategy"] = "channel"
    else:
        kw.update(strategy="group", group_size=spec.group_size)
    if spec.actorder:
        kw["actorder"] = "weight"  # columns swept in act-order; groups stay contiguous
    return QuantizationScheme(targets=targets, weights=QuantizationArgs(**kw), format=PACKED)


def check_layout(q, name: str) -> None:
    """A layer's grid as the format stores it: whole groups of contiguous columns (the
    package loads no per-column group index, nor a shorter last group)."""
    spec, cols = q.spec, q.codes.shape[-1]
    contiguous = torch.arange(cols) // gs if (gs := spec.group_size) else torch.zeros(cols)
    if q.g_idx is not None and not torch.equal(q.g_idx.long().cpu(), contiguous.long()):
        raise ValueError(
            f"{name}: its act-order groups are not contiguous columns (g_idx), which the "
            "compressed-tensors format no longer loads; quantize without actorder, or per "
            "channel (no group_size), to save it"
        )
    if not spec.fp8 and gs is not None and cols % gs:
        raise ValueError(group_error(name, cols, gs))


def group_error(name: str, cols: int, group_size: int) -> str:
    return (
        f"{name}: {cols} input columns are not a whole number of groups of {group_size}, "
        "which the compressed-tensors format cannot hold; choose a group size that divides "
        "every quantized layer's inputs"
    )


def compressed_tensors_of(q, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One quantized linear's tensors in the format (local names), scales in `dtype` (the
    model's, as the package allocates them when it loads)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    rows, cols = q.codes.shape
    scale = q.scale.to(dtype).contiguous()
    if q.spec.fp8:
        return {"weight": q.codes.contiguous(), "weight_scale": scale}
    offset = 1 << (q.spec.bits - 1)  # the package's codes are signed: code - 2**(bits-1)
    signed = (q.codes.to(torch.int16) - offset).to(torch.int8)
    out = {
        "weight_packed": pack_to_int32(signed, q.spec.bits),
        "weight_scale": scale,
        "weight_shape": torch.tensor([rows, cols]),
    }
    if not q.spec.sym:
        zero = (q.zero.to(torch.int16) - offset).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zero, q.spec.bits, packed_dim=0).contiguous()
    return out


def quantization_config(model: nn.Module, quantized: dict):
    """The package's `QuantizationConfig`: one config group per grid (targets: the class name
    `Linear`; several grids: each its layers' names), every linear not quantized ignored."""
    from compressed_tensors.quantization import QuantizationConfig

    specs: dict[Any, list[str]] = {}
    for name, q in quantized.items():  # QuantizedWeights, or their QuantSpecs
        specs.setdefault(getattr(q, "spec", q), []).append(name)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignore = [n for n in linears if n not in quantized]
    if len(specs) == 1:
        groups = {"group_0": scheme_of(next(iter(specs)), ["Linear"])}
    else:  # several grids: each group names its layers
        groups = {f"group_{i}": scheme_of(s, names) for i, (s, names) in enumerate(specs.items())}
    formats = {g.format for g in groups.values()}
    return QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=ignore,
    )


def sparsity_config(report) -> dict:
    """What the prune did, in the package's sparsity config schema: the fraction pruned and
    its structure, recorded only (format dense: the zeros are stored as codes like any other
    weight; no targets, so no runtime reads it as a sparse format to decompress or a 2:4
    kernel to run)."""
    from compressed_tensors.config import DenseSparsityConfig

    cfg = DenseSparsityConfig(
        format="dense",
        targets=[],
        ignore=[],
        global_sparsity=float(report.achieved_sparsity),
        sparsity_structure=report.pattern,
    )
    return cfg.model_dump(exclude={"registry_requires_subclass"})


def config_entry(model: nn.Module, quantized: dict, report) -> dict:
    """config.json's `quantization_config` of a quantized prune: the package's config of
    `quantized` ({linear name: QuantizedWeight}) with its version, method and the sparsity."""
    import compressed_tensors

    qcfg = quantization_config(model, quantized)
    return {
        "version": compressed_tensors.__version__,
        **qcfg.model_dump(exclude=["quant_method"]),
        "quant_method": "compressed-tensors",
        "sparsity_config": sparsity_config(report),
    }


def add_config_entry(config_file, entry: dict) -> None:
    """config.json rewritten with its `quantization_config` (sorted keys, as transformers
    writes it)."""
    import json
    from pathlib import Path

    from compressed_tensors.base import QUANTIZATION_CONFIG_NAME

    path = Path(config_file)
    data = json.loads(path.read_text())
    data[QUANTIZATION_CONFIG_NAME] = entry
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight")


def scheme_args(config_dict: dict) -> dict | None:
    """The weights' grid of a compressed-tensors checkpoint's config (its one config group):
    `{"num_bits", "type", "symmetric"}`; None for a checkpoint without one. Several grids
    (mixed precision) are refused: read such a checkpoint with transformers."""
    qc = config_dict.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return None
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or not isinstance(groups[0].get("weights"), dict):
        raise ValueError(
            "a compressed-tensors checkpoint of several grids is not read block by block; "
            "load it with transformers"
        )
    fmt = groups[0].get("format") or qc.get("format")
    if fmt not in (PACKED, FLOAT):
        raise ValueError(
            f"a compressed-tensors checkpoint in the {fmt!r} format is not read block by block "
            f"(only {PACKED!r} and {FLOAT!r}); load it with transformers"
        )
    w = groups[0]["weights"]
    return {"num_bits": int(w["num_bits"]), "type": w["type"], "symmetric": bool(w["symmetric"])}


def dequantized(parts: dict[str, torch.Tensor], args: dict) -> torch.Tensor:
    """One linear's weight from its compressed tensors (`parts` by suffix, as `SUFFIXES`) in
    its scales' dtype: `(codes - zero) * scale` as `layer_solves.as_stored` computes it, so a
    checkpoint read back is the model that was saved."""
    scale = parts["weight_scale"]
    if args["type"] == "float":
        codes = parts["weight"]
        return codes.to(scale.dtype) * _per_column(scale, codes.shape[1])
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits = args["num_bits"]
    rows, cols = (int(v) for v in parts["weight_shape"].tolist())
    codes = unpack_from_int32(parts["weight_packed"], bits, torch.Size([rows, cols]))
    codes = codes.to(torch.int16)
    if "weight_zero_point" in parts:
        zshape = torch.Size([rows, scale.shape[1]])
        zero = unpack_from_int32(parts["weight_zero_point"], bits, zshape, packed_dim=0)
        codes = codes - _per_column(zero.to(torch.int16), cols)
    return codes.to(scale.dtype) * _per_column(scale, cols)


def _per_column(t: torch.Tensor, cols: int) -> torch.Tensor:
    """A row's per-group values `[rows, n_groups]` spread over its `cols` columns (groups of
    `cols // n_groups` contiguous columns; one group: the whole row)."""
    groups = t.shape[1]
    return t.repeat_interleave(cols // groups, dim=1) if groups > 1 else t


# ---------------------------------------------------------------------- MoE experts

_EXPERT = re.compile(r"^(?P<module>.+)\.(?P<proj>\w+)\[(?P<index>\d+)\]$")


def split_expert(name: str) -> tuple[str, int] | None:
    """`("model.layers.1.mlp.experts.gate_up_proj", 3)` of an expert layer's name
    `model.layers.1.mlp.experts.gate_up_proj[3]`; None for any other name."""
    m = _EXPERT.match(name)
    return None if m is None else (f"{m['module']}.{m['proj']}", int(m["index"]))


def savable_problem(spec, transposed: bool, name: str) -> str | None:
    """Why an expert quantized with `spec` cannot be saved (None: it can): experts stored
    transposed have no linears in the checkpoint, and transformers reads no zero points of
    quantized experts (an asymmetric integer grid would load wrong)."""
    if transposed:
        return (
            f"{name}: its experts are stored transposed in one 3-D parameter ([experts, in, "
            "out]), which the compressed-tensors format cannot hold as linears; leave the "
            "experts out with ignore to save the quantized model, or quantize without saving"
        )
    if spec is not None and not spec.fp8 and not spec.sym:
        return (
            f"{name}: an asymmetric grid on MoE experts is not saved: transformers loads "
            "quantized experts without their zero points; quantize them symmetric (--sym), "
            "or leave the experts out with ignore"
        )
    return None


def rows_of(q, rows: slice):
    """The quantized rows `rows` of a layer: their codes, scales and zero points."""
    zero = None if q.zero is None else q.zero[rows]
    return replace(q, codes=q.codes[rows], scale=q.scale[rows], zero=zero)


def dense_error(name: str) -> str:
    return (
        f"{name}: MoE experts left dense in a quantized checkpoint do not load (transformers "
        "reads a quantized checkpoint's experts only quantized); quantize every expert (drop "
        "them from ignore/targets), or save without quant"
    )
