"""GPTQ (IST-DASLab `fasterquant`): quantization alone, the OBS sweep with every weight kept
and each rounded to its group's grid before its error is spread (`sparsegpt_layer` with
sparsity 0 and `quant=`)."""

from __future__ import annotations

import warnings

import torch

from ..hessian import DEFAULT_PERCDAMP, InverseHessian
from ..quant import QuantSpec, as_spec
from ..result import PruneResult
from ..validation import check_bool
from .core import check_obs_options
from .obs import DEFAULT_BLOCKSIZE, OBS_OPS
from .registry import Method, register, solver_defaults
from .skeleton import Problem, check_given_mask, run_solver
from .sparsegpt import obs_solve


@torch.no_grad()
def gptq_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    sym: bool = True,
    actorder: bool = False,
    params: str = "sweep",
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    backend: str = "auto",
    format: str = "int",
    hinv: InverseHessian | None = None,
    inplace: bool = False,
    inverse_method: str = "direct",
    mask: torch.Tensor | None = None,
) -> PruneResult:
    """Quantize one layer with GPTQ: `bits`-bit grids per `group_size` columns (None: per
    output channel), symmetric or not, columns by decreasing diag(H) with `actorder`.
    params="sweep" finds a group's grid from the updated weights when the sweep reaches it
    (IST-DASLab `fasterquant`), "static" every grid from W before the sweep (llm-compressor's
    `quantize_weight`). `format="fp8"`: float8 e4m3 per channel instead. `r.quant` holds the
    codes, scales, zero points (and `g_idx` with act-order); `r.weight` is the dequantized
    weight, `r.loss` its `tr(D H D^T)`; every weight is kept (`r.mask` all True), or with
    `mask` (a keep-mask) the weights outside it are zero and stay zero: GPTQ of a pruned
    layer that keeps its sparsity (the errors spread over the kept weights only)."""
    spec = QuantSpec(
        bits=bits, group_size=None if format == "fp8" else group_size, sym=sym,
        actorder=actorder, format=format, params=params,
    )  # fmt: skip
    return _gptq(W, H, spec, blocksize, percdamp, backend, hinv, inplace, inverse_method, mask)


def _gptq(W, H, spec, blocksize, percdamp, backend, hinv, inplace, inverse_method, mask=None):
    def check(W: torch.Tensor, H: torch.Tensor | None) -> None:
        nonlocal blocksize, percdamp
        blocksize, percdamp = check_obs_options(blocksize, percdamp)
        check_given_mask(mask, W, 0, 0)

    def solve(p: Problem):
        return obs_solve(p, blocksize, percdamp, hinv, inverse_method, mask, spec)

    return run_solver(
        "gptq", W, H, 0.0, 0, 0, solve, backend=backend, ops=OBS_OPS, inplace=inplace,
        check=check,
    )  # fmt: skip


def gptq_solver(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.0,
    prune_n: int = 0,
    prune_m: int = 0,
    *,
    quant: QuantSpec | str = "w4a16",
    keep_zeros: bool = False,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    backend: str = "auto",
    hinv: InverseHessian | None = None,
) -> PruneResult:
    """Method "gptq" in the common solver form: `quant` (a `QuantSpec` or a preset name)
    with nothing pruned (sparsity 0; to prune as well, `sparsegpt_layer(..., quant=)`).
    `keep_zeros`: the weights already zero stay zero (quantizing a pruned model keeps its
    sparsity); off, every weight absorbs the rounding errors as GPTQ as published does."""
    if sparsity != 0 or prune_n:
        raise ValueError(
            f"method 'gptq' quantizes without pruning: sparsity must be 0 and no N:M pattern, "
            f"got sparsity={sparsity!r}, prune_n={prune_n!r} (to prune and quantize in one "
            "sweep use method 'sparsegpt' with quant)"
        )
    spec = as_spec(quant)
    if spec is None:
        raise TypeError("quant must be a QuantSpec or a preset name for method 'gptq', got None")
    mask = W != 0 if check_bool(keep_zeros, "keep_zeros") else None
    if (
        mask is None
        and isinstance(W, torch.Tensor)
        and W.numel()
        and (W == 0).float().mean() > 0.25
    ):
        warnings.warn(
            "method 'gptq' on a layer with over 25% zeros: the rounding errors spread into "
            "them, so the layer is no longer sparse; keep_zeros=True (--keep-zeros) keeps "
            "its sparsity",
            stacklevel=2,
        )
    return _gptq(W, H, spec, blocksize, percdamp, backend, hinv, False, "direct", mask)


register(
    Method(
        "gptq",
        gptq_solver,
        "quantization alone: the OBS sweep rounding each weight to its grid (GPTQ)",
        solver_defaults(gptq_solver, "keep_zeros", "blocksize", "percdamp", "backend"),
        shares_inverse=True,
        takes_quant=True,
        prunes=False,
    )
)
