"""Layer-wise sparsity: uniform, or OWL's outlier-weighted allocation (Yin et al., "Outlier
Weighed Layerwise Sparsity (OWL)", ICML 2024, arXiv:2310.05175).

OWL gives decoder blocks with more outliers a lower sparsity. One dense pass over the
calibration activations (block by block, as the pruning pass) collects each linear's
per-input-channel `sum_t x_tj^2`; a block's outlier ratio `D_i` is the fraction of its
weights (all its pruned linears together) whose Wanda score `|W_ij| ||x_j||` exceeds
`threshold` x the block's mean score. The ratios are scaled to `[0, 2 lambda]` (min-max) and
block i keeps `1 - sparsity + D'_i - mean(D')`, the mean weighted by the block's pruned
parameters, so the whole model keeps `1 - sparsity` of them. N:M patterns stay uniform.
"""

from __future__ import annotations

import torch

from ..config import ALLOCATIONS, OWL_LAMBDA, OWL_THRESHOLD, PruneConfig, options
from ..layers import get_weight
from .capture import capture_inputs, run_block, to_device
from .hessian_hooks import InputHooks

__all__ = [
    "ALLOCATIONS",
    "OWL_LAMBDA",
    "OWL_THRESHOLD",
    "check_allocation",
    "outlier_ratios",
    "owl_block_sparsities",
]


def check_allocation(
    allocation: object, threshold: object, lam: object
) -> tuple[str, float, float]:
    """The allocation arguments checked by their declarations in `PruneConfig` (errors name
    the argument)."""
    opts = options(PruneConfig)
    return (
        opts["allocation"].check(allocation, "allocation"),
        opts["owl_threshold"].check(threshold, "owl_threshold"),
        opts["owl_lambda"].check(lam, "owl_lambda"),
    )


def owl_block_sparsities(
    ratios: list[float], params: list[int], sparsity: float, lam: float
) -> list[float]:
    """Per-block sparsities from outlier ratios (OWL's rule, parameter-weighted mean so the
    total stays `sparsity`). `ValueError` naming owl_lambda if a block leaves [0, 1)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(params, dtype=torch.float64)
    span = (r.max() - r.min()).item()
    if len(ratios) < 2 or span == 0:
        return [sparsity] * len(ratios)
    d = (r - r.min()) / span * (2 * lam)
    keep = (1 - sparsity) + d - (d * w).sum() / w.sum()
    out = (1 - keep).tolist()
    if min(out) < 0 or max(out) >= 1:
        raise ValueError(
            f"owl_lambda={lam} moves block sparsities to [{min(out):.3f}, {max(out):.3f}], "
            f"outside [0, 1) at sparsity {sparsity}: use a smaller owl_lambda"
        )
    return out


class _SumSquares(InputHooks):
    """Each input group's `sum_t x_tj^2` per input channel (float64), Wanda's scaler
    before normalisation; an expert's over the tokens it receives."""

    def __init__(self, block, bl, moe_calibration="routed"):
        self.sumsq: dict[str, torch.Tensor] = {}
        super().__init__(block, bl, moe_calibration)

    def observe(self, name: str, x: torch.Tensor, per_token: bool) -> None:
        s = x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        self.sumsq[name] = s if name not in self.sumsq else self.sumsq[name].to(s.device) + s


@torch.no_grad()
def outlier_ratios(
    model,
    block_list,
    layouts,
    kinds,
    calib,
    batch_size,
    device,
    offload,
    threshold,
    comm=None,
    moe_calibration="routed",
) -> list[float]:
    """Each block's fraction of Wanda-score outliers (above `threshold` x the block's mean)
    over all its pruned layers (every expert included; `layouts`: `BlockLayers` per block),
    from one dense pass over `calib` (reduced over ranks when `comm` is given)."""
    acts = capture_inputs(model, block_list, kinds, calib, batch_size, device, offload)
    arg_sets = [(to_device(a, device), to_device(k, device)) for a, k in acts.arg_sets]
    ratios = []
    for i, block in enumerate(block_list):
        home = next(block.parameters()).device
        block.to(device)
        hooks = _SumSquares(block, layouts[i], moe_calibration)
        try:
            run_block(block, acts, batch_size, device, arg_sets, kinds[i], hooks, store=True)
        finally:
            hooks.remove()
        sumsq = hooks.sumsq
        acts.swap()
        if comm is not None:  # sums over every rank's shard
            for k in sorted(sumsq):
                buf = sumsq[k].to(comm.device)
                torch.distributed.all_reduce(buf)
                sumsq[k] = buf
        scores = []
        for k, mod in layouts[i].layers.items():
            lead = hooks.leader.get(k, k)
            if lead not in sumsq:
                raise RuntimeError(f"block {i}: {k} was never called in the block's forward")
            if k in hooks.tokens and not bool(sumsq[lead].any()):
                continue  # an expert no token reached: no Wanda score
            W = get_weight(mod).detach()
            scale = sumsq[lead].to(W.device).sqrt().to(torch.float32)
            scores.append((W.float().abs() * scale).flatten())
        s = torch.cat(scores)
        ratios.append((s > threshold * s.mean()).double().mean().item())
        block.to(home)
    del acts
    return ratios
