"""llm-compressor's SparseGPT `sparsify_weight` contract on fastprune, and the patch that
makes an installed llm-compressor's `SparseGPTModifier` call it."""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn

from ..core import check_obs_args
from ..hessian import inverse_hessian
from ..layers import get_weight, layer_kind, to_layer_layout
from ..obs import OBS_OPS, block_bounds, nm_blocksize, obs_prune
from ..ops import Kernels
from ..sparsegpt import sparsegpt_layer
from ..validation import (
    compute_dtype,
)


@torch.no_grad()
def sparsify_weight(
    module: nn.Module,
    hessians_dict: dict,
    sparsity: float,
    prune_n: int,
    prune_m: int,
    block_size: int,
    dampening_frac: float,
    preserve_sparsity_mask: bool,
    *,
    backend: str = "auto",
) -> tuple[float, torch.Tensor]:
    """llm-compressor's SparseGPT `sparsify_weight`, solved by fastprune.

    Same contract: takes (and removes) `hessians_dict[module]`, prunes `module.weight` in
    float32 without modifying the module, and returns `(loss, weight)`: the OBS error
    estimate `sum err^2 / 2` and the pruned weight in the module's shape and dtype.
    `preserve_sparsity_mask=True` keeps every weight that is already zero pruned (raising
    `ValueError` if the layer is already sparser than `sparsity`): unstructured blocks that
    are below the target extend the mask by the usual threshold, full ones keep it; N:M
    groups prune their existing zeros plus the `prune_n` lowest others; error updates never
    revive a preserved zero. `H^-1` is factored with the reference's arithmetic
    (`inverse_method="reference"`). Differences: a Hessian that will not factor is retried with
    more damping (llm-compressor falls back to `H^-1 = I`); `sparsity=0` (unstructured,
    no preserved mask) prunes nothing.
    """
    kind = layer_kind(module)
    if dampening_frac is None:
        raise TypeError("dampening_frac must be a number, got None")
    W = get_weight(module, kind).detach().float()
    H = hessians_dict.pop(module)  # the original consumes the Hessian the same way
    H = H.to(W.device)
    if preserve_sparsity_mask:
        loss, Q = _sparsify_preserving(
            W, H, sparsity, prune_n, prune_m, block_size, dampening_frac, backend
        )
    else:
        r = sparsegpt_layer(
            W,
            H,
            sparsity,
            prune_n,
            prune_m,
            block_size,
            dampening_frac,
            backend=backend,
            inverse_method="reference",  # llm-compressor's own H^-1 arithmetic
        )
        loss, Q = r.info.get("obs_loss_estimate", 0.0), r.weight
    return float(loss), to_layer_layout(Q, module, kind)


def _sparsify_preserving(W, H, sparsity, prune_n, prune_m, block_size, percdamp, backend):
    """SparseGPT that keeps the existing zeros of `W` pruned (llm-compressor's
    `preserve_sparsity_mask`), on the shared OBS loop. Returns `(obs_loss, pruned float32
    weight)`."""
    W, H, sparsity, n, m, block_size, percdamp = check_obs_args(
        W, H, sparsity, prune_n, prune_m, block_size, percdamp, backend, blocksize_name="block_size"
    )
    kernels = Kernels(backend, W.device, OBS_OPS)
    dtype = compute_dtype(W, H)
    inv = inverse_hessian(H, percdamp, dtype=dtype, method="reference")
    Wc = W.to(dtype, copy=True)
    Wc[:, inv.dead] = 0
    base = Wc == 0  # True = pruned already (dead columns included, as llm-compressor)
    current = base.sum().item() / base.numel()
    if current > sparsity:
        raise ValueError(
            f"the layer is already {current:.4f} sparse, above the target sparsity "
            f"{sparsity}: lower the target or set preserve_sparsity_mask=False"
        )
    bounds = block_bounds(W.shape[1], nm_blocksize(block_size, m))
    Q, _, losses = obs_prune(Wc, inv.hinv, bounds, sparsity, n, m, kernels, preserve=base)
    return losses.sum().item(), Q


# modules whose `sparsify_weight` the SparseGPT modifier calls, newest layout first
_LLMC_MODULES = (
    "llmcompressor.modifiers.pruning.sparsegpt.base",
    "llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify",
    "llmcompressor.modifiers.obcq.base",
    "llmcompressor.modifiers.obcq.sgpt_sparsify",
)
_llmc_originals: dict[str, object] = {}


def patch_llmcompressor() -> list[str]:
    """Make an installed llm-compressor's `SparseGPTModifier` prune with fastprune.

    Replaces `sparsify_weight` in the modules the modifier looks it up from (so models,
    recipes and `oneshot` calls stay unchanged). Idempotent; `unpatch_llmcompressor()`
    restores the originals. Returns the names of the patched modules. Raises ImportError
    if llm-compressor is not installed or has no SparseGPT `sparsify_weight`.
    """
    try:
        importlib.import_module("llmcompressor")
    except ImportError as e:
        raise ImportError(
            "patch_llmcompressor() needs llm-compressor: pip install llmcompressor"
        ) from e
    patched = []
    for name in _LLMC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        current = getattr(mod, "sparsify_weight", None)
        if current is None:
            continue
        if current is not sparsify_weight:
            _llmc_originals[name] = current
            mod.sparsify_weight = sparsify_weight
        patched.append(name)
    if not patched:
        raise ImportError(
            "this llm-compressor version has no SparseGPT sparsify_weight in "
            f"{', '.join(_LLMC_MODULES)}; fastprune cannot patch it"
        )
    return patched


def unpatch_llmcompressor() -> list[str]:
    """Undo `patch_llmcompressor()`; returns the names of the restored modules."""
    restored = []
    for name, original in list(_llmc_originals.items()):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "sparsify_weight", None) is sparsify_weight:
            mod.sparsify_weight = original
            restored.append(name)
        del _llmc_originals[name]
    return restored
