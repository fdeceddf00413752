"""Saving a pruned model (safetensors + tokenizer) and checking that what was written is what
was pruned: reload, compare every pruned weight bit for bit, recount sparsity and the N:M
pattern, and compare the reloaded model's logits with the in-memory model's."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..models import dtype_kwarg, find_blocks, forget_gguf_origin, get_weight, model_device
from ..pipeline import PruneReport, check_model_sparsity
from ..pipeline.block_layers import count_block_zeros, resolve_layer
from ..streaming import PARTIAL


def save_pruned(model, tokenizer, directory, report: PruneReport | None = None) -> Path:
    """`save_pretrained` (safetensors) of the model and, if given, its tokenizer; the report
    (if given) goes beside them as `fastprune_report.json`. A quantized prune (the report's
    `quantized` layers) is written in the compressed-tensors format (see
    `quantized_checkpoint`). Until everything is written the folder holds a `PARTIAL` marker,
    which says why when the save fails. The report's totals get the bytes of the weights
    saved (`checkpoint_bytes`)."""
    import json

    out = Path(directory).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"save directory {str(directory)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    marker = out / PARTIAL
    _mark(marker, "writing")
    try:
        forget_gguf_origin(model)
        if report is not None and report.quantized:
            from .quantized_checkpoint import write_quantized

            report.totals["checkpoint"] = write_quantized(model, out, report)
        else:
            model.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        if report is not None:
            report.totals["checkpoint_bytes"] = weight_bytes(out)
            (out / "fastprune_report.json").write_text(json.dumps(report.to_dict(), indent=1))
    except BaseException as e:
        _mark(marker, "abandoned", f"{type(e).__name__}: {e}")
        raise
    marker.unlink()
    return out


def _mark(marker: Path, status: str, reason: str | None = None) -> None:
    """The folder's `PARTIAL` marker, as the streamed writer leaves one."""
    import json
    import os
    import time

    info = {"partial": True, "status": status, "reason": reason, "pid": os.getpid()}
    info["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    marker.write_text(json.dumps(info, indent=1))


def weight_bytes(folder: Path) -> int:
    """Bytes of the safetensors files in `folder` (the saved weights)."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


@torch.no_grad()
def verify_saved(
    model, directory, report: PruneReport, sample_ids: torch.Tensor | None = None
) -> dict:
    """Reload `directory` and check it against the in-memory `model`: every pruned weight
    equal bit for bit, the sparsity / N:M pattern of `report` present in the reloaded
    weights, and logits on `sample_ids` equal. A quantized checkpoint is dequantized by the
    compressed-tensors package as it loads, to the weights the prune left in memory. Raises
    `ValueError` on any mismatch."""
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    kw = {dtype_kwarg(): dtype}
    quantized = getattr(report, "quantized", None) or {}
    if quantized:
        from transformers import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():  # "the quantization_config from the model will be used"
        warnings.filterwarnings("ignore", "You passed `quantization_config`", UserWarning)
        loaded = AutoModelForCausalLM.from_pretrained(str(directory), **kw)
    loaded.eval()
    loaded.to(model_device(model))
    path = report.totals.get("blocks_path")
    _, mine = find_blocks(model, path)
    _, theirs = find_blocks(loaded, path)
    for lr in report.layers:
        rel = lr.name.split(".", 1)[1]
        a = get_weight(resolve_layer(mine[lr.block], rel)).detach().cpu()
        b = get_weight(resolve_layer(theirs[lr.block], rel)).detach().cpu()
        if a.shape != b.shape or not torch.equal(a, b):
            raise ValueError(f"saved weight {path}.{lr.name} differs from the pruned model")
    counts = check_model_sparsity(loaded, report, path)
    zeros, entries = count_block_zeros(theirs)
    if "block_zeros" in report.totals and (zeros, entries) != (
        report.totals["block_zeros"],
        report.totals["block_params"],
    ):
        raise ValueError(
            f"the reloaded blocks hold {zeros:,} zeros in {entries:,} matrix entries; the "
            f"pruned model {report.totals['block_zeros']:,} in {report.totals['block_params']:,}"
        )
    counts["block_sparsity"] = zeros / max(1, entries)
    out = {"reloaded": str(directory), **counts, "max_logit_diff": None}
    if sample_ids is not None:
        x = sample_ids.reshape(1, -1) if sample_ids.dim() == 1 else sample_ids
        ref = model(input_ids=x.to(model_device(model)), use_cache=False).logits.float().cpu()
        got = loaded(input_ids=x.to(model_device(model)), use_cache=False).logits.float().cpu()
        diff = (ref - got).abs().max().item()
        out["max_logit_diff"] = diff
        scale = ref.abs().max().item()
        if not diff <= 1e-5 * max(1.0, scale):
            raise ValueError(f"reloaded model's logits differ from the pruned model's by {diff:g}")
    return out
