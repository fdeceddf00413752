"""llm-compressor's SparseGPT `sparsify_weight` contract on fastprune, and the patch that
makes an installed llm-compressor's `SparseGPTModifier` call it and its `GPTQModifier` call
`llmc_gptq.quantize_weight`."""

from __future__ import annotations

import importlib
import inspect
import logging
import sys

import torch
from torch import nn

from ..hessian import inverse_hessian
from ..layers import get_weight, layer_kind, to_layer_layout
from ..ops import Kernels
from ..solvers.core import check_obs_args
from ..solvers.obs import OBS_OPS, block_bounds, nm_blocksize, obs_prune
from ..solvers.sparsegpt import sparsegpt_layer
from ..validation import check_pattern, compute_dtype
from .llmc_gptq import QUANTIZE_WEIGHT_PARAMS, quantize_weight

log = logging.getLogger("fastprune")


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
    (`inverse_method="reference"`). N:M on a width that is not a multiple of M (a 130-column
    Linear, a 27-column Conv2d stem) prunes the full groups and then, as llm-compressor,
    the `prune_n` lowest of the partial last group (all of it when it has `prune_n`
    columns); narrower than `prune_n` (where llm-compressor fails) it stays dense. This is
    logged on the "fastprune" logger (INFO). Differences: a Hessian that will not factor is
    retried with more damping (llm-compressor falls back to `H^-1 = I`); `sparsity=0`
    (unstructured, no preserved mask) prunes nothing.
    """
    kind = layer_kind(module)
    if dampening_frac is None:
        raise TypeError("dampening_frac must be a number, got None")
    W = get_weight(module, kind).detach().float()
    H = hessians_dict.pop(module)  # the original consumes the Hessian the same way
    H = H.to(W.device)
    n, m = check_pattern(prune_n, prune_m, 0)  # types and values; the width is ours below
    if preserve_sparsity_mask or (n and W.shape[1] % m):
        loss, Q = _sparsify_obs(
            W, H, sparsity, n, m, block_size, dampening_frac, backend, preserve_sparsity_mask
        )
    else:
        r = sparsegpt_layer(
            W,
            H,
            sparsity,
            prune_n,
            prune_m,
            blocksize=block_size,
            percdamp=dampening_frac,
            backend=backend,
            inverse_method="reference",  # llm-compressor's own H^-1 arithmetic
        )
        loss, Q = r.info.get("obs_loss_estimate", 0.0), r.weight
    return float(loss), to_layer_layout(Q, module, kind)


def sparsify_preserving(W, H, sparsity, prune_n, prune_m, block_size, percdamp, backend):
    """`_sparsify_obs` keeping the existing zeros of `W` pruned."""
    n, m = check_pattern(prune_n, prune_m, 0)
    return _sparsify_obs(W, H, sparsity, n, m, block_size, percdamp, backend, True)


def _sparsify_obs(W, H, sparsity, n, m, block_size, percdamp, backend, preserve):
    """SparseGPT on the shared OBS loop with llm-compressor's extras: `preserve` keeps the
    existing zeros of `W` pruned (`preserve_sparsity_mask`), and N:M on a width that is not
    a multiple of M prunes the full groups and then the partial last group as llm-compressor
    does (see `_partial_group_keep`). Returns `(obs_loss, pruned float32 weight)`."""
    W, H, sparsity, _, _, block_size, percdamp = check_obs_args(
        W, H, sparsity, 0, 0, block_size, percdamp, backend, blocksize_name="block_size"
    )
    kernels = Kernels(backend, W.device, OBS_OPS)
    dtype = compute_dtype(W, H)
    inv = inverse_hessian(H, percdamp, dtype=dtype, method="reference")
    Wc = W.to(dtype, copy=True)
    Wc[:, inv.dead] = 0
    base = None
    if preserve:
        base = Wc == 0  # True = pruned already (dead columns included, as llm-compressor)
        current = base.sum().item() / base.numel()
        if current > sparsity:
            raise ValueError(
                f"the layer is already {current:.4f} sparse, above the target sparsity "
                f"{sparsity}: lower the target or set preserve_sparsity_mask=False"
            )
    cols = W.shape[1]
    full = cols - cols % m if n else cols
    bounds = block_bounds(full, nm_blocksize(block_size, m))
    # the full part; its error updates reach the partial group's columns too
    Q, keep, losses = obs_prune(Wc, inv.hinv, bounds, sparsity, n, m, kernels, preserve=base)
    if full < cols:
        tail_base = None if base is None else base[:, full:]
        tail_keep = _partial_group_keep(Q[:, full:], inv.hinv.diagonal()[full:], n, tail_base)
        fixed = torch.ones_like(keep)
        fixed[:, full:] = tail_keep
        Q, _, tail_losses = obs_prune(
            Q, inv.hinv, [(full, cols)], 0.0, 0, 0, kernels, fixed_keep=fixed
        )
        losses += tail_losses
        log.info(
            "sparsify_weight: %d columns, not a multiple of M=%d: %d pruned per row in "
            "the partial last group of %d (llm-compressor's rule)",
            cols,
            m,
            n if cols - full >= n else 0,
            cols - full,
        )
    return losses.sum().item(), Q


def _partial_group_keep(W1, hdiag, n, base1=None):
    """Keep-mask of a trailing N:M group narrower than M, as llm-compressor's loop treats
    it: the `n` lowest `w^2 / Hinv_jj^2` of its columns pruned per row (preserved zeros
    first), which with `n` columns left prunes them all. With fewer than `n` columns
    llm-compressor fails (`topk` out of range); here they keep their weights (preserved
    zeros stay pruned)."""
    pruned = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
    if base1 is not None:
        pruned |= base1
    if W1.shape[1] >= n:
        score = W1**2 / hdiag.reshape(1, -1) ** 2
        if base1 is not None:
            score = score.masked_fill(base1, 0)
        pruned.scatter_(1, torch.topk(score, n, dim=1, largest=False).indices, True)
    return ~pruned


# modules whose `sparsify_weight` the SparseGPT modifier calls, newest layout first
_LLMC_MODULES = (
    "llmcompressor.modifiers.pruning.sparsegpt.base",
    "llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify",
    "llmcompressor.modifiers.obcq.base",
    "llmcompressor.modifiers.obcq.sgpt_sparsify",
)
# modules whose `quantize_weight` the GPTQ modifier calls; the older layout is looked at only
# where the newer is absent (its package warns on import), so that its other signature is
# refused by name rather than left unpatched
_LLMC_GPTQ_MODULES = (
    "llmcompressor.modifiers.gptq.base",
    "llmcompressor.modifiers.gptq.gptq_quantize",
)
_LLMC_GPTQ_OLD_MODULES = (
    "llmcompressor.modifiers.quantization.gptq.base",
    "llmcompressor.modifiers.quantization.gptq.gptq_quantize",
)
_llmc_originals: dict[tuple[str, str], object] = {}


def _targets(attr: str, names: tuple[str, ...]) -> list[tuple[str, object]]:
    """`(module name, module)` of the importable modules in `names` that hold `attr`."""
    found = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(mod, attr, None) is not None:
            found.append((name, mod))
    return found


def _check_gptq_signature(targets) -> None:
    """Refuse, before anything is patched, a `quantize_weight` whose parameters are not
    those of the llm-compressor version fastprune's replacement follows."""
    for name, mod in targets:
        current = mod.quantize_weight
        if current is quantize_weight:
            continue
        try:
            params = tuple(inspect.signature(current).parameters)
        except (TypeError, ValueError):
            params = None
        if params != QUANTIZE_WEIGHT_PARAMS:
            version = getattr(sys.modules.get("llmcompressor"), "__version__", "unknown")
            raise ImportError(
                f"llm-compressor {version}: {name}.quantize_weight{params} is not the "
                f"signature fastprune replaces {QUANTIZE_WEIGHT_PARAMS} (llmcompressor "
                "0.14); use patch_llmcompressor(gptq=False) to patch SparseGPT alone"
            )


def patch_llmcompressor(*, sparsegpt: bool = True, gptq: bool = True) -> list[str]:
    """Make an installed llm-compressor's `SparseGPTModifier` prune and its `GPTQModifier`
    quantize with fastprune.

    Replaces `sparsify_weight` (SparseGPT) and `quantize_weight` (GPTQ, llmcompressor 0.14's
    signature) in the modules the modifiers look them up from (so models, recipes and
    `oneshot` calls stay unchanged). Idempotent; `unpatch_llmcompressor()` restores the
    originals. Returns the names of the patched modules. Raises ImportError, patching
    nothing, if llm-compressor is not installed, lacks a requested function, or has a
    `quantize_weight` of another signature (`gptq=False` leaves GPTQ alone).
    """
    try:
        importlib.import_module("llmcompressor")
    except ImportError as e:
        raise ImportError(
            "patch_llmcompressor() needs llm-compressor: pip install llmcompressor"
        ) from e
    plan = []
    if sparsegpt:
        found = _targets("sparsify_weight", _LLMC_MODULES)
        if not found:
            raise ImportError(
                "this llm-compressor version has no SparseGPT sparsify_weight in "
                f"{', '.join(_LLMC_MODULES)}; fastprune cannot patch it "
                "(patch_llmcompressor(sparsegpt=False) patches GPTQ alone)"
            )
        plan += [(name, mod, "sparsify_weight", sparsify_weight) for name, mod in found]
    if gptq:
        found = _targets("quantize_weight", _LLMC_GPTQ_MODULES)
        found = found or _targets("quantize_weight", _LLMC_GPTQ_OLD_MODULES)
        if not found:
            raise ImportError(
                "this llm-compressor version has no GPTQ quantize_weight in "
                f"{', '.join(_LLMC_GPTQ_MODULES)}; fastprune cannot patch it "
                "(patch_llmcompressor(gptq=False) patches SparseGPT alone)"
            )
        _check_gptq_signature(found)
        plan += [(name, mod, "quantize_weight", quantize_weight) for name, mod in found]
    for name, mod, attr, ours in plan:
        current = getattr(mod, attr)
        if current is not ours:
            _llmc_originals[(name, attr)] = current
            setattr(mod, attr, ours)
    return [name for name, *_ in plan]


def unpatch_llmcompressor() -> list[str]:
    """Undo `patch_llmcompressor()`; returns the names of the restored modules."""
    ours = {"sparsify_weight": sparsify_weight, "quantize_weight": quantize_weight}
    restored = []
    for (name, attr), original in list(_llmc_originals.items()):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, attr, None) is ours[attr]:
            setattr(mod, attr, original)
            restored.append(name)
        del _llmc_originals[(name, attr)]
    return restored
