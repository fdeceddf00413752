"""What every layer-level solver shares: input checks, the Wanda score, the result's base
info, inverse resolution and the finishing of a result (loss, dtype cast, timing)."""

from __future__ import annotations

import torch

from .validation import compute_dtype


def wanda_score(
    W: torch.Tensor,
    H: torch.Tensor | None = None,
    *,
    scaler: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Wanda's score `|W| * sqrt(scaler)` with `scaler = diag(H)/2` (the per-input-channel
    `||x_j||^2 / n`) unless a `scaler` is given; in float32, or float64 for float64 inputs."""
    if scaler is None:
        if H is None:
            raise ValueError("wanda_score needs H or scaler")
        scaler = torch.diagonal(H) / 2
    dtype = dtype or compute_dtype(W, scaler)
    return W.to(dtype).abs() * torch.sqrt(scaler.to(dtype)).reshape(1, -1)
