"""llm-compressor's SparseGPT `sparsify_weight` contract on fastprune, and the patch that
makes an installed llm-compressor's `SparseGPTModifier` call it."""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn

from .. import ops
from ..hessian import inverse_hessian
from ..layers import get_weight, layer_kind, to_layer_layout
from ..masks import nm_prune_mask
from ..sparsegpt import OBS_OPS, block_bounds, nm_blocksize, sparsegpt_layer
from ..validation import (
    check_backend,
    check_hessian,
    check_int,
    check_pattern,
    check_percdamp,
    check_sparsity,
    check_weight,
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
    revive a preserved zero. Differences: a Hessian that will not factor is retried with
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
            W, H, sparsity, prune_n, prune_m, block_size, dampening_frac, backend=backend
        )
        loss, Q = r.info.get("obs_loss_estimate", 0.0), r.weight
    return float(loss), to_layer_layout(Q, module, kind)


def _sparsify_preserving(W, H, sparsity, prune_n, prune_m, block_size, percdamp, backend):
    """SparseGPT that keeps the existing zeros of `W` pruned (llm-compressor's
    `preserve_sparsity_mask`). Returns `(obs_loss, pruned float32 weight)`."""
    W = check_weight(W)
    H = check_hessian(H, W.shape[1], W.device)
    sparsity = check_sparsity(sparsity)
    n, m = check_pattern(prune_n, prune_m, W.shape[1])
    block_size = check_int(block_size, "block_size", minimum=1)
    percdamp = check_percdamp(percdamp)
    check_backend(backend)
    name = ops.resolve_backend(backend, W.device, OBS_OPS)
    block_mask = ops.get_op("block_prune_mask", name)
    sweep = ops.get_op("obs_sweep", name)
    dtype = compute_dtype(W, H)
    inv = inverse_hessian(H, percdamp, dtype=dtype)
    hinv, hdiag = inv.hinv, inv.hinv.diagonal()
    Wc = W.to(dtype, copy=True)
    Wc[:, inv.dead] = 0
    base = Wc == 0  # True = pruned already (dead columns included, as llm-compressor)
    current = base.sum().item() / base.numel()
    if current > sparsity:
        raise ValueError(
            f"the layer is already {current:.4f} sparse, above the target sparsity "
            f"{sparsity}: lower the target or set preserve_sparsity_mask=False"
        )
    rows, cols = Wc.shape
    loss = torch.zeros(rows, dtype=dtype, device=Wc.device)
    for i1, i2 in block_bounds(cols, nm_blocksize(block_size, m)):
        W1 = Wc[:, i1:i2].clone()
        Hinv1 = hinv[i1:i2, i1:i2]
        base1 = base[:, i1:i2]
        if n == 0:
            if int(base1.numel() * sparsity) > base1.sum().item():
                prune1 = block_mask(W1.masked_fill(base1, 0), hdiag[i1:i2], sparsity)
            else:
                prune1 = base1
            Q1, Err1, _, l1 = sweep(W1, Hinv1, prune1, 0, 0)
            loss += l1
        else:  # group by group: each group's choice sees the updates of the groups before
            Q1 = torch.empty_like(W1)
            Err1 = torch.empty_like(W1)
            for g1 in range(0, i2 - i1, m):
                g2 = g1 + m
                d = Hinv1.diagonal()[g1:g2].reshape(1, -1)
                score = (W1[:, g1:g2] ** 2 / d**2).masked_fill(base1[:, g1:g2], 0)
                prune_g = nm_prune_mask(score, n, m) | base1[:, g1:g2]
                Qg, Eg, _, lg = sweep(W1[:, g1:g2], Hinv1[g1:g2, g1:g2], prune_g, 0, 0)
                Q1[:, g1:g2], Err1[:, g1:g2] = Qg, Eg
                loss += lg
                if g2 < i2 - i1:
                    W1[:, g2:].addmm_(Eg, Hinv1[g1:g2, g2:], alpha=-1)
        Wc[:, i1:i2] = Q1
        if i2 < cols:
            Wc[:, i2:].addmm_(Err1, hinv[i1:i2, i2:], alpha=-1)
            Wc[:, i2:].masked_fill_(base[:, i2:], 0)  # preserved zeros get no update
    return loss.sum().item(), Wc


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
