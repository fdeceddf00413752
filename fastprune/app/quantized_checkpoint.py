"""A quantized prune saved in the compressed-tensors format (the `compressed-tensors` package,
which transformers and vLLM load): each quantized linear as "pack-quantized" integer codes
(`weight_packed`, `weight_scale`, `weight_zero_point` for an asymmetric grid, `weight_shape`)
or "float-quantized" FP8 (`weight` in float8 e4m3, `weight_scale`), and config.json's
`quantization_config` naming the grid, the quantized linears (every other one ignored:
embeddings and the head stay as they are) and the sparsity of the prune.

The codes written are fastprune's own (`QuantizedWeight.codes`, shifted to the package's
signed range), packed by the package's `pack_to_int32`; nothing is rounded again."""

from __future__ import annotations

import json
from pathlib import Path
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
    for name, q in quantized.items():
        specs.setdefault(q.spec, []).append(name)
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


def write_quantized(model: nn.Module, out: Path, report) -> dict:
    """`model` with its quantized linears (`report.quantized`, by module name) replaced by
    their compressed tensors, saved with `save_pretrained` into `out`; config.json gets the
    `quantization_config`. Fused MoE experts are written as the checkpoint's linears
    (`quantized_experts`). Returns what was written: format, layers, bytes."""
    reason = missing_package()
    if reason:
        raise ValueError(reason)
    import compressed_tensors
    from compressed_tensors.base import QUANTIZATION_CONFIG_NAME

    from .quantized_experts import expert_params, expert_state, split_expert

    quantized = report.quantized
    modules = dict(model.named_modules())
    for name, q in quantized.items():
        if split_expert(name) is None and not isinstance(modules.get(name), nn.Linear):
            kind = type(modules.get(name)).__name__
            raise ValueError(
                f"{name} ({kind}) is not an nn.Linear, which the compressed-tensors format "
                "quantizes alone"
            )
        check_layout(q, name)
    dtype = next(model.parameters()).dtype
    state = model.state_dict()
    linears = {n: q for n, q in quantized.items() if split_expert(n) is None}
    for name, q in linears.items():
        del state[f"{name}.weight"]
        for key, t in compressed_tensors_of(q, dtype).items():
            state[f"{name}.{key}"] = t
    kw = {}
    if expert_params(model):  # written in the checkpoint's layout here, as transformers would
        from transformers.core_model_loading import revert_weight_conversion

        tensors, experts = expert_state(
            model, quantized, state, lambda q: compressed_tensors_of(q, dtype)
        )
        state = {**revert_weight_conversion(model, state), **tensors}
        linears.update(experts)
        kw["save_original_format"] = False
    qcfg = quantization_config(model, linears)
    model.save_pretrained(out, state_dict=state, safe_serialization=True, **kw)
    config_file = out / "config.json"
    data = json.loads(config_file.read_text())
    data[QUANTIZATION_CONFIG_NAME] = {
        "version": compressed_tensors.__version__,
        **qcfg.model_dump(exclude=["quant_method"]),
        "quant_method": "compressed-tensors",
        "sparsity_config": sparsity_config(report),
    }
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True))
    return {"format": qcfg.format, "layers": len(quantized)}
