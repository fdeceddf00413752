"""A quantized prune streamed into a compressed-tensors checkpoint: each block's quantized
linears written as their compressed tensors (`streaming.compressed`) under the source
checkpoint's own names as the block leaves, fused MoE experts as the checkpoint's per-expert
linears, and config.json's `quantization_config` at the end: the tensors and config the
in-memory save of the same prune writes. What cannot be written is refused before anything
is."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..layers import ExpertProjection, get_weight
from ..streaming import Checkpoint
from ..streaming.compressed import (
    check_layout,
    compressed_tensors_of,
    config_entry,
    dense_error,
    group_error,
    missing_package,
    rows_of,
    savable_problem,
)
from .block_layers import find_block_layers
from .experts import dense_experts, fused_experts


def check_quant_stream(
    model: nn.Module, blocks_path: str, blocks, config, spec, ckpt: Checkpoint
) -> None:
    """Before anything is written: the compressed-tensors package is there, every layer to
    quantize is an nn.Linear or an expert the checkpoint keeps one linear each, every expert
    to quantize can be saved, no fused expert parameter is left dense, and the group size
    divides every layer to quantize (act-order groups are not contiguous: refused)."""
    reason = missing_package()
    if reason:
        raise ValueError(f"a quantized streamed prune writes compressed tensors: {reason}")
    gs = None if spec.fp8 else spec.group_size
    if gs is not None and spec.actorder:
        raise ValueError(
            f"actorder with groups (group_size={gs}) is not saved: act-order groups are not "
            "contiguous columns, which the compressed-tensors format no longer loads; use "
            "act-order per channel, or no act-order"
        )
    for i, block in enumerate(blocks):
        where = f"{blocks_path}.{i}"
        layout = find_block_layers(block, config.targets, config.ignore, where)
        problems = [dense_error(p) for p in dense_experts(block, layout.layers, where)]
        paths = {id(m): path for path, m in block.named_modules()}
        for key, layer in layout.layers.items():
            if isinstance(layer, ExpertProjection):
                problems.append(savable_problem(spec, layer.transposed, f"{where}.{key}"))
                param = getattr(layer.experts.module, layer.proj)
                name = f"{where}.{paths[id(layer.experts.module)]}.{layer.proj}"
                if ckpt.source(name, tuple(param.shape)).direct:
                    problems.append(fused_source_error(name))
            elif not isinstance(layer, nn.Linear):
                problems.append(
                    f"{where}.{key} ({type(layer).__name__}) is not an nn.Linear, which the "
                    "compressed-tensors format quantizes alone"
                )
            cols = get_weight(layer).shape[-1]
            if gs is not None and cols % gs:
                problems.append(group_error(f"{where}.{key}", cols, gs))
        problem = next((p for p in problems if p), None)
        if problem:
            raise ValueError(problem)


def fused_source_error(name: str) -> str:
    return (
        f"{name}: the source checkpoint stores its experts fused in one tensor, not as one "
        "linear per expert, which a quantized checkpoint cannot hold; prune it in memory "
        "(prune_model and save_pruned) to write the experts as linears"
    )


class CompressedBlocks:
    """Writes a block's tensors in the compressed-tensors layout: its quantized layers'
    codes taken out of `quantized` (the report's, so host memory never holds more than a
    block of codes) and remembered by name and grid for the config."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype):
        self.ckpt, self.dtype = ckpt, dtype
        self.specs: dict[str, object] = {}  # checkpoint linear -> QuantSpec

    def tensors(
        self, block: nn.Module, prefix: str, quantized: dict
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint key, tensor) of every tensor of `block` (named `prefix`), each key once."""
        seen: set[str] = set()
        for name, t in self.ckpt.module_params(block, prefix):
            for key, part in self._of(block, prefix, name, t, quantized):
                if key not in seen:
                    seen.add(key)
                    yield key, part

    def _of(self, block, prefix, name, t, quantized):
        src = self.ckpt.source(name, t.shape)
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and module in quantized:
            q = quantized.pop(module)
            check_layout(q, module)
            (key,) = src.weights
            self.specs[module] = q.spec
            yield from self._compressed(key[: -len(".weight")], q)
            return
        experts = {}
        if t.dim() == 3:
            experts = {e: quantized.pop(f"{name}[{e}]", None) for e in range(t.shape[0])}
            experts = {e: q for e, q in experts.items() if q is not None}
        if not experts:
            yield from src.split(t)
            return
        owner, _, proj = name[len(prefix) + 1 :].rpartition(".")
        fx = fused_experts(block.get_submodule(owner))
        for q in experts.values():
            problem = savable_problem(q.spec, fx.transposed, name)
            if problem:
                raise ValueError(problem)
            check_layout(q, name)
        if len(experts) < fx.num_experts:
            raise ValueError(dense_error(name))
        if src.direct:
            raise ValueError(fused_source_error(name))
        rows = t.shape[1] // len(src.groups)
        for g, keys in enumerate(src.groups):
            for e, key in enumerate(keys):
                part = rows_of(experts[e], slice(g * rows, (g + 1) * rows))
                self.specs[key[: -len(".weight")]] = part.spec
                yield from self._compressed(key[: -len(".weight")], part)

    def _compressed(self, base: str, q) -> Iterator[tuple[str, torch.Tensor]]:
        for k, v in compressed_tensors_of(q, self.dtype).items():
            yield f"{base}.{k}", v

    def config(self, model: nn.Module, report) -> dict:
        """`{"quantization_config": ...}` for config.json, as the in-memory save writes it."""
        return {"quantization_config": config_entry(model, self.specs, report)}
