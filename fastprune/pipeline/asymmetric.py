"""Asymmetric calibration: fit each pruned layer to the dense model's outputs.

Sequential pruning calibrates layer `l` on the inputs `X~` that the already pruned layers
produce, and asks the pruned weights `W^` to reproduce `W X~`, so the error of every earlier
layer is taken as given. Asymmetric calibration (as GPTAQ does for quantization: Li et al.,
ICML 2025, arXiv:2504.02692) asks for the dense model's output instead: minimise
`||W X - W^ X~||^2`, `X` the dense model's inputs of the same layer on the same tokens.
With `H = 2/n X~^T X~` (samples as rows) and the cross term `C = 2/n X^T X~`,

    ||W X - W^ X~||^2 = ||(W' - W^) X~||^2 + const,   W' = W C H^-1 = W + W (C - H) H^-1,

so pruning the corrected weights `W'` under `H` with any method solves the asymmetric
problem exactly (`H^-1` damped as the method damps it). Where the dense and pruned inputs
coincide (the first block), `C = H` and `W' = W`.
"""

from __future__ import annotations

import math

import torch

from ..hessian import DEFAULT_PERCDAMP, InverseHessian, _check_batch, inverse_hessian


class CrossAccumulator:
    """Streams paired layer inputs into `C = 2/n sum x_dense^T x_pruned` in float32, with
    the sample count and the arithmetic of `HessianAccumulator`'s reference path (so `C`
    equals that `H` bit for bit when every pair is equal)."""

    def __init__(self, cols: int, device: torch.device | str | None = None) -> None:
        self.cols = int(cols)
        self.C: torch.Tensor | None = torch.zeros(cols, cols, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, dense: torch.Tensor, pruned: torch.Tensor) -> None:
        """Add one batch: the same tokens' inputs in the dense and in the pruned model,
        `[batch, tokens, cols]` (batch samples) or `[tokens, cols]` (one sample)."""
        dense = _check_batch(dense, self.cols)
        pruned = _check_batch(pruned, self.cols)
        if dense.shape != pruned.shape:
            raise ValueError(
                f"dense and pruned inputs differ in shape: {tuple(dense.shape)} vs "
                f"{tuple(pruned.shape)} (the pairs must be the same tokens)"
            )
        if dense.shape[0] * dense.shape[1] == 0:
            return
        total = self.nsamples + dense.shape[0]
        s = math.sqrt(2 / total)
        xd = s * dense.reshape(-1, self.cols).t().to(self.C.device, torch.float32)
        xp = s * pruned.reshape(-1, self.cols).t().to(self.C.device, torch.float32)
        self.C *= self.nsamples / total
        self.C += xd @ xp.t()
        self.nsamples = total


@torch.no_grad()
def asymmetric_target(
    W: torch.Tensor,
    H: torch.Tensor,
    C: torch.Tensor,
    percdamp: float = DEFAULT_PERCDAMP,
    hinv: InverseHessian | None = None,
) -> tuple[torch.Tensor, dict]:
    """The weights `W' = W + W (C - H) H^-1` to prune under `H` (see the module docstring),
    in `W`'s dtype, and what was done (`asymmetric_correction`: `||W' - W|| / ||W||`).
    `H^-1` is `inverse_hessian(H, percdamp)` (damped, dead columns fixed), or `hinv` when
    the caller has it. `C == H` (no drift yet) returns `W` itself."""
    if C.shape != H.shape:
        raise ValueError(f"C must have H's shape {tuple(H.shape)}, got {tuple(C.shape)}")
    if torch.equal(C, H):
        return W, {"asymmetric_correction": 0.0}
    inv = hinv if hinv is not None else inverse_hessian(H, percdamp)
    U = inv.hinv  # H^-1 = U^T U
    W32 = W.to(U.dtype)
    M = W32 @ (C.to(U.dtype) - H.to(U.dtype))
    delta = (M @ U.t()) @ U
    target = W32 + delta
    rel = (torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(W32).clamp_min(1e-30)).item()
    info = {"asymmetric_correction": rel, "asymmetric_damp": inv.percdamp}
    if not math.isfinite(rel):
        raise ValueError("the asymmetric correction is not finite (C or H holds NaN/inf)")
    return target.to(W.dtype), info
