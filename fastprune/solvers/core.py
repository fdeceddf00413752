"""What every layer-level solver shares: input checks, the Wanda score, the result's base
info, inverse resolution and the finishing of a result (dtype cast, in-place write, timing)."""

from __future__ import annotations

import math
import time

import torch

from ..hessian import H_RANGE as H_RANGE  # the Hessian's range, part of this module's rule
from ..hessian import (
    InverseHessian,
    check_inverse_of,
    hessian_diagonal,
    hessian_in_range,
    hessian_scale_exponent,
    inverse_hessian,
    scale_pow2,
)
from ..masks import pattern_name, pruned_fraction
from ..quant import QuantSpec
from ..result import PruneResult
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


def active_world() -> int:
    """The process group's size when one is initialised, else 1: solvers whose options need
    every calibration sample in one process refuse a larger one."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def wanda_score(
    W: torch.Tensor,
    H: torch.Tensor | None = None,
    *,
    scaler: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Wanda's score `|W| * sqrt(scaler)` with `scaler = diag(H)/2` (the per-input-channel
    `||x_j||^2 / n`; H may be that diagonal alone) unless a `scaler` is given; in float32,
    or float64 for float64 inputs."""
    if scaler is None:
        if H is None:
            raise ValueError("wanda_score needs H or scaler")
        scaler = hessian_diagonal(H) / 2
    dtype = dtype or compute_dtype(W, scaler)
    return W.to(dtype).abs() * torch.sqrt(scaler.to(dtype)).reshape(1, -1)


# A layer is solved as given when max|W| lies in W_RANGE, max diag(H) in H_RANGE (the
# Hessian's, `fastprune.hessian.scaling`) and max|W|^2 * max diag(H) (the size of a score
# `w^2 h` or a loss term) is below PRODUCT_MAX: then no score, OBS error or loss term comes
# near float32's range (2^-126 .. 2^128) even summed over 2^20 columns. Outside them it is
# solved on a power-of-two rescaled copy.
W_RANGE = (2.0**-32, 2.0**32)
PRODUCT_MAX = 2.0**96
W_TARGET_EXP = 17  # a rescaled W has max|W| in [2^16, 2^17)
# info entries that carry a loss (scale s_w^2 s_h); "damp" carries H's scale s_h
LOSS_INFO_KEYS = ("obs_loss_estimate", "loss_before", "loss_after", "loss_masked")


def problem_scales(W: torch.Tensor, H: torch.Tensor | None) -> tuple[int, int] | None:
    """None when `W`, `H` are in the ranges above (solved as given, bit for bit), else the
    exponents `(ew, eh)` of the power-of-two scales `s_w = 2^ew`, `s_h = 2^eh` (`eh` even,
    so `sqrt(s_h)` is exact too) that bring max|W| to [2^16, 2^17) and max diag(H) to [1, 4).
    Every mask rule here is invariant to these scales (see docs/semantics.md)."""
    lo, hi = torch.aminmax(W)  # max|W| without a |W| temporary
    wmax = torch.stack([lo.abs(), hi.abs()]).amax().item()
    hmax = 0.0 if H is None else hessian_diagonal(H).amax().item()
    w_ok = wmax == 0 or W_RANGE[0] <= wmax <= W_RANGE[1]
    h_ok = hessian_in_range(hmax)
    if w_ok and h_ok and wmax * wmax * hmax <= PRODUCT_MAX:
        return None
    ew = math.frexp(wmax)[1] - W_TARGET_EXP if wmax > 0 else 0
    return ew, hessian_scale_exponent(hmax)


def _check_inverse_type(hinv: object) -> None:
    if not isinstance(hinv, InverseHessian):
        raise TypeError("hinv must be an InverseHessian from fastprune.inverse_hessian")


def scale_inverse(hinv: InverseHessian, eh: int, dtype: torch.dtype) -> InverseHessian:
    """The inverse of `H / 2^eh` from `hinv`, that of `H`: `U` times `2^(eh/2)` (eh even)."""
    _check_inverse_type(hinv)
    U = scale_pow2(hinv.hinv.to(dtype, copy=True), eh // 2)
    return InverseHessian(U, hinv.dead, math.ldexp(hinv.damp, -eh), hinv.percdamp, hinv.retries)


def check_obs_args(
    W, H, sparsity, prune_n, prune_m, blocksize, percdamp, backend, *, blocksize_name="blocksize"
):
    """The checks of the OBS solvers' common arguments; returns them normalised.
    `blocksize_name` is how the caller spells that argument (llm-compressor: block_size)."""
    W = check_weight(W)
    H = check_hessian(H, W.shape[1], W.device)
    sparsity = check_sparsity(sparsity)
    n, m = check_pattern(prune_n, prune_m, W.shape[1])
    blocksize, percdamp = check_obs_options(blocksize, percdamp, blocksize_name)
    check_backend(backend)
    return W, H, sparsity, n, m, blocksize, percdamp


def check_obs_options(
    blocksize: object, percdamp: object, blocksize_name: str = "blocksize"
) -> tuple[int, float]:
    """The OBS solvers' own options checked: a block width >= 1 and a damping fraction."""
    return check_int(blocksize, blocksize_name, minimum=1), check_percdamp(percdamp)


def check_quant_pattern(spec: QuantSpec | None, prune_n: object, prune_m: object) -> None:
    """A grid's groups hold whole N:M groups (the sweep chooses both at a group's start)."""
    gs = None if spec is None else spec.group_size
    if gs and prune_n and isinstance(prune_m, int) and prune_m and gs % prune_m:
        raise ValueError(
            f"quant.group_size={gs} must be a multiple of prune_m={prune_m} (whole N:M groups)"
        )


def base_info(
    method: str,
    W: torch.Tensor,
    sparsity: float,
    n: int,
    m: int,
    backend: str,
    dtype: torch.dtype | None = None,
) -> dict:
    """The entries every result's `info` starts with; `kernels` is filled as ops run."""
    return {
        "method": method,
        "sparsity": n / m if n else sparsity,
        "pattern": pattern_name(n, m),
        "device": str(W.device),
        "backend": backend,
        "kernels": {},
        "shape": tuple(W.shape),
        "compute_dtype": str(dtype or compute_dtype(W)).replace("torch.", ""),
    }


def resolve_inverse(
    hinv: InverseHessian | None,
    H: torch.Tensor,
    percdamp: float,
    dtype: torch.dtype,
    method: str = "direct",
) -> InverseHessian:
    """`hinv` checked against `H` (shape, device) and cast to `dtype`, or a new inverse by
    `inverse_hessian(H, percdamp, method=method)` (`method` does not apply to a given `hinv`)."""
    if hinv is None:
        return inverse_hessian(H, percdamp, dtype=dtype, method=method)
    _check_inverse_type(hinv)
    if hinv.hinv.shape != H.shape or hinv.hinv.device != H.device:
        raise ValueError(
            f"hinv is {tuple(hinv.hinv.shape)} on {hinv.hinv.device}, "
            f"H is {tuple(H.shape)} on {H.device}"
        )
    check_inverse_of(hinv, H)  # the OBS updates and the reported loss assume it
    if hinv.hinv.dtype != dtype:
        hinv = InverseHessian(
            hinv.hinv.to(dtype), hinv.dead, hinv.damp, hinv.percdamp, hinv.retries
        )
    return hinv


def merge_kernel_info(info: dict, more: dict) -> None:
    """A later step's `kernels` (what ran) and `kernel_fallbacks` (what fell back, and why)
    join `info`'s, for a solve made of several solver calls."""
    info["kernels"] = {**info["kernels"], **more["kernels"]}
    if "kernel_fallbacks" in more:
        info["kernel_fallbacks"] = {**info.get("kernel_fallbacks", {}), **more["kernel_fallbacks"]}


def finish(
    W: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    loss: float | None,
    info: dict,
    t0: float,
    inplace: bool,
) -> PruneResult:
    """The result: `weight` cast to W's dtype (written into W if `inplace`, after every
    figure that needs the original W was computed), achieved sparsity and seconds."""
    weight = weight.to(W.dtype)
    if inplace:
        W.copy_(weight)
        weight = W
    info["achieved_sparsity"] = pruned_fraction(keep)
    info["seconds"] = time.perf_counter() - t0
    return PruneResult(weight, keep, loss, info)
