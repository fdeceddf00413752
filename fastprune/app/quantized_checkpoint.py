"""A quantized prune saved in the compressed-tensors format: the model's quantized linears
(`report.quantized`) replaced by their compressed tensors and written by `save_pretrained`
(the format itself: `fastprune.streaming.compressed`, which the streamed writer shares), fused
MoE experts as the checkpoint's per-expert linears (`quantized_experts`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..streaming.compressed import (  # noqa: F401  (the format's names, importable from here)
    FLOAT,
    MIN_VERSION,
    PACKED,
    add_config_entry,
    check_layout,
    compressed_tensors_of,
    config_entry,
    group_error,
    missing_package,
    quantization_config,
    scheme_of,
    sparsity_config,
)


def write_quantized(model: nn.Module, out: Path, report) -> dict:
    """`model` with its quantized linears (`report.quantized`, by module name) replaced by
    their compressed tensors, saved with `save_pretrained` into `out`; config.json gets the
    `quantization_config`. Fused MoE experts are written as the checkpoint's linears
    (`quantized_experts`). Returns what was written: format, layers, bytes."""
    reason = missing_package()
    if reason:
        raise ValueError(reason)
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
    entry = config_entry(model, linears, report)
    model.save_pretrained(out, state_dict=state, safe_serialization=True, **kw)
    add_config_entry(out / "config.json", entry)
    return {"format": entry["format"], "layers": len(quantized)}
