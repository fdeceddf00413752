"""llm-compressor's GPTQ `quantize_weight` contract (llmcompressor 0.14) on fastprune's sweep:
the grids llm-compressor's observer found (its `scale` and `zero_point`, passed in) are the
static grids of fastprune's OBS sweep, so the codes sit on exactly the grid it saves."""

from __future__ import annotations

import torch

from ..hessian import inverse_hessian
from ..ops import Kernels
from ..quant import QuantSpec
from ..solvers.core import check_obs_options
from ..solvers.obs import OBS_OPS, QuantPlan, block_bounds, obs_prune

# the parameters of llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight this replaces
QUANTIZE_WEIGHT_PARAMS = (
    "weights",
    "hessians",
    "scale",
    "zero_point",
    "global_scale",
    "quant_args",
    "blocksize",
    "percdamp",
)
STRATEGIES = ("channel", "group", "tensor")


def _value(x) -> str | None:
    """An enum member or its value (compressed-tensors stores values) as a lower-case str."""
    if x is None or x is False:
        return None
    return str(getattr(x, "value", x)).lower()


def gptq_args(quant_args) -> tuple[QuantSpec, str, bool]:
    """`(spec, strategy, actorder)` of llm-compressor's weight `QuantizationArgs`; raises
    `NotImplementedError` naming each setting fastprune's sweep does not offer."""
    qtype, strategy = _value(quant_args.type), _value(quant_args.strategy)
    actorder = _value(getattr(quant_args, "actorder", None))
    bad = []
    if qtype != "int":
        bad.append(f"type={qtype!r} (only integer grids)")
    if strategy not in STRATEGIES:
        bad.append(f"strategy={strategy!r} (only {', '.join(STRATEGIES)})")
    if actorder not in (None, "weight", "static"):
        bad.append(f"actorder={actorder!r} (only None, 'weight' / 'static')")
    if not isinstance(quant_args.num_bits, int) or not 2 <= quant_args.num_bits <= 8:
        bad.append(f"num_bits={quant_args.num_bits!r} (only 2..8)")
    if bad:
        raise NotImplementedError(
            "fastprune's GPTQ (patch_llmcompressor) does not support "
            + "; ".join(bad)
            + ": call unpatch_llmcompressor() or patch_llmcompressor(gptq=False) for this recipe"
        )
    spec = QuantSpec(
        bits=quant_args.num_bits,
        group_size=1 if strategy == "group" else None,
        sym=bool(quant_args.symmetric),
        params="static",
    )
    return spec, strategy, actorder is not None


def _grids(spec, strategy, scale, zero_point, g_idx, rows):
    """llm-compressor's grids of one layer as fastprune's `(scale, zero) [rows, G]` float32:
    per row (channel, tensor: G = 1), or per column in the sweep's order (group: G = cols,
    column j on its group's grid `g_idx[j]`). compressed-tensors' signed zero point is
    fastprune's minus `2**(bits-1)`; a symmetric grid's is `(maxq + 1) / 2`."""
    if strategy == "tensor":
        s, z = scale.reshape(1, 1).expand(rows, 1), zero_point.reshape(1, 1).expand(rows, 1)
    elif strategy == "channel":
        s, z = scale.reshape(rows, -1)[:, :1], zero_point.reshape(rows, -1)[:, :1]
    else:
        s, z = scale[:, g_idx], zero_point[:, g_idx]
    s = s.to(torch.float32)
    if spec.sym:
        z = torch.full_like(s, (spec.maxq + 1) / 2)
    else:
        z = z.to(torch.float32)
        if not torch.equal(z, z.round()):
            raise NotImplementedError("fastprune's GPTQ needs integer zero points")
        z = z + 2 ** (spec.bits - 1)
    return s.contiguous(), z.contiguous()


def _plan(spec, s, z, bounds, cols, device) -> QuantPlan:
    """A static `QuantPlan` over `bounds` holding the grids `s`, `z` (one per row, or one per
    column of the sweep: groups of one column)."""
    if spec.group_size is None:
        group = torch.zeros(cols, dtype=torch.long, device=device)
        starts = [0] * len(bounds)
    else:
        group = torch.arange(cols, device=device)
        starts = [i1 for i1, _ in bounds]
    return QuantPlan(spec, s, z, group, starts, find=False)


@torch.no_grad()
def gptq_quantize_one(W, H, s, z, spec, perm, blocksize, percdamp, backend):
    """One layer: the sweep of `W [rows, cols]` float32 in the column order `perm` (None:
    as given) rounding each weight to its grid (`s`, `z` in the sweep's order), `H^-1` with
    SparseGPT's / llm-compressor's arithmetic. Returns `(Q in W's column order, loss)`."""
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    inv = inverse_hessian(H, percdamp, dtype=torch.float32, method="reference")
    Wc = W.to(torch.float32, copy=True)
    Wc[:, inv.dead] = 0
    cols = W.shape[1]
    bounds = block_bounds(cols, blocksize)
    plan = _plan(spec, s, z, bounds, cols, W.device)
    kernels = Kernels(backend, W.device, OBS_OPS)
    keep = torch.ones_like(Wc, dtype=torch.bool)  # nothing pruned
    Q, _, losses = obs_prune(Wc, inv.hinv, bounds, 0.0, 0, 0, kernels, fixed_keep=keep, quant=plan)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, losses.sum()


@torch.no_grad()
def quantize_weight(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    global_scale: torch.Tensor | None,
    quant_args,
    blocksize: int = 128,
    percdamp: float = 0.01,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llm-compressor's GPTQ `quantize_weight` (0.14), solved by fastprune.

    Same contract: `weights [B, rows, cols]`, normalized `hessians [B, cols, cols]`, the
    observer's stacked `scale` / `zero_point`; returns `(quantized weights [B, rows, cols]
    in weights' dtype, losses [B] (sum err^2 / 2), RTN-fallback flags [B])`. Each layer is
    fastprune's static-grid GPTQ sweep on llm-compressor's own grids; act-order "weight"
    ("static") sweeps columns by decreasing diag(H), each on its original group's grid.
    Refuses (NotImplementedError, naming them) float types, global scales, the block and
    tensor-group strategies. Difference: a Hessian that will not factor is retried with
    more damping (llm-compressor rounds that layer to nearest), so the flags are all False.
    """
    if weights.dim() != 3 or hessians.dim() != 3 or weights.shape[0] != hessians.shape[0]:
        raise ValueError("weights and hessians must be [batch, ...] with one batch size")
    if global_scale is not None:
        raise NotImplementedError(
            "fastprune's GPTQ (patch_llmcompressor) does not support global scales "
            "(tensor-group schemes such as NVFP4)"
        )
    spec, strategy, actorder = gptq_args(quant_args)
    blocksize, percdamp = check_obs_options(blocksize, percdamp)
    B, rows, cols = weights.shape
    device = weights.device
    out = torch.empty(weights.shape, dtype=weights.dtype, device=device)
    losses = torch.zeros(B, dtype=torch.float32, device=device)
    for b in range(B):
        W = weights[b].to(torch.float32)
        H = hessians[b].to(device=device, dtype=torch.float32)
        perm = None
        if actorder:  # llm-compressor's own call, so equal diagonals keep its order
            perm = torch.argsort(torch.diagonal(H), descending=True)
        g_idx = None
        if strategy == "group":
            g_idx = torch.arange(cols, device=device) // quant_args.group_size
            g_idx = g_idx if perm is None else g_idx[perm]
        s, z = _grids(spec, strategy, scale[b].to(device), zero_point[b].to(device), g_idx, rows)
        Q, loss = gptq_quantize_one(W, H, s, z, spec, perm, blocksize, percdamp, backend)
        out[b] = Q.to(weights.dtype)
        losses[b] = loss
    return out, losses, torch.zeros(B, dtype=torch.bool, device=device)
