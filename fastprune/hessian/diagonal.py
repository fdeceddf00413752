"""Per-input-channel statistics in `cols` floats instead of `cols^2`: the diagonal of `H` alone,
as Wanda keeps it (for the methods that read nothing else: Wanda, GBLM), and the ROSE
repository's running `scaler_row` (`RunningScaler`)."""

from __future__ import annotations

import math

import torch

from ..validation import all_finite, check_finite, check_int
from .accumulate import _check_batch


def scaler_update(scaler: torch.Tensor, nsamples: int, sq: torch.Tensor, b: int) -> int:
    """Wanda's running mean of each input channel's squared norm, in place and in Wanda's
    arithmetic: `scaler *= n/(n+b)`, then `scaler += sq/(n+b)` for `b` new samples whose
    squared norms per channel are `sq`; returns `n+b`."""
    total = nsamples + b
    scaler *= nsamples / total
    scaler += sq / total
    return total


@torch.no_grad()
def running_scaler_update(
    scaler: torch.Tensor, nsamples: int, x: torch.Tensor, b: int, *, prescale: bool = False
) -> int:
    """Wanda's running mean over samples of each input channel's squared norm, in place, for
    `b` new samples whose inputs are the columns of `x [cols, tokens]`; returns the new sample
    count. `prescale=True` is the ROSE code's variant: the inputs are first scaled by
    `sqrt(2/n)` as for `H`, so sample k counts with weight `2/(N n_k)`, not `1/N`."""
    x = x.float()
    if prescale:
        x = math.sqrt(2 / (nsamples + b)) * x
    return scaler_update(scaler, nsamples, torch.norm(x, p=2, dim=1) ** 2, b)


def hessian_diagonal(H: torch.Tensor) -> torch.Tensor:
    """`diag(H)` of a full `H [cols, cols]`, or `H` itself when only its diagonal `[cols]` is
    kept (`DiagonalAccumulator`)."""
    return H if H.dim() == 1 else torch.diagonal(H)


def _columns(inp: torch.Tensor, cols: int, device) -> tuple[torch.Tensor | None, int]:
    """A checked batch of layer inputs as `x [cols, tokens]` on `device` and its sample
    count; `(None, 0)` for a batch without tokens (it adds and counts nothing)."""
    inp = _check_batch(inp, cols)
    if inp.shape[0] * inp.shape[1] == 0:
        return None, 0
    return inp.reshape(-1, cols).t().to(device=device), inp.shape[0]


def _check_squares(stat: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """NaN/inf inputs, or squared norms beyond float32, named."""
    if not all_finite(stat):
        check_finite(x, "inp")
        raise ValueError(
            f"inp: the squared input norms overflow float32 ({what}); scale the activations down"
        )


class DiagonalAccumulator:
    """Streams activations (as `HessianAccumulator`) into `diag(H)` alone: `cols` floats
    instead of `cols^2`, and no GEMM. It keeps Wanda's own statistic, `scaler_row` (the
    running mean over samples of `||x_j||^2`, in Wanda's arithmetic, so a pipeline's Wanda
    matches the original code bit for bit), and `H = 2 * scaler_row` (exact: a power of
    two). For the methods that read only the diagonal (Wanda, GBLM); no layer loss
    `tr(D H D^T)` can be computed from it."""

    def __init__(self, cols: int, device: torch.device | str | None = None) -> None:
        self.cols = check_int(cols, "cols", minimum=1)
        self.scaler_row: torch.Tensor | None = torch.zeros(cols, device=device)
        self.nsamples = 0

    @property
    def H(self) -> torch.Tensor | None:
        return None if self.scaler_row is None else 2 * self.scaler_row

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        self.scaler_row = None if value is None else value / 2

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """Add a batch of layer inputs `[batch, tokens, cols]` (batch samples) or
        `[tokens, cols]` (one sample); a batch without tokens adds and counts nothing."""
        x, b = _columns(inp, self.cols, self.scaler_row.device)
        if x is None:
            return
        x = x.float()
        sq = torch.norm(x, p=2, dim=1) ** 2
        _check_squares(sq, x, "diag(H)")
        self.nsamples = scaler_update(self.scaler_row, self.nsamples, sq, b)


class RunningScaler:
    """Streams activations (as `HessianAccumulator`) into the ROSE repository's pre-pruning
    `scaler_row`, in its arithmetic (`running_scaler_update(..., prescale=True)`, as the
    compat `ROSE.add_batch`): `(2/N) sum_k ||x_k||^2 / n_k` per input channel, sample k
    weighted `1/n_k` (`n_k`: samples seen once its batch was added), not equally as in
    `diag(H)/2`. The pipeline accumulates it beside `H` for ROSE's `score_scaler="running"`."""

    def __init__(self, cols: int, device: torch.device | str | None = None) -> None:
        self.cols = check_int(cols, "cols", minimum=1)
        self.scaler_row: torch.Tensor | None = torch.zeros(cols, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """Add a batch of layer inputs `[batch, tokens, cols]` (batch samples) or
        `[tokens, cols]` (one sample); a batch without tokens adds and counts nothing."""
        x, b = _columns(inp, self.cols, self.scaler_row.device)
        if x is None:
            return
        self.nsamples = running_scaler_update(self.scaler_row, self.nsamples, x, b, prescale=True)
        _check_squares(self.scaler_row, x, "scaler_row")


__all__ = [
    "DiagonalAccumulator",
    "RunningScaler",
    "hessian_diagonal",
    "running_scaler_update",
    "scaler_update",
]
