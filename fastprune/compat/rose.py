"""Drop-in for the ROSE repository's `ROSE` class, and `rose_with_scaler`."""

from __future__ import annotations

import torch
from torch import nn

from ..hessian import DEFAULT_PERCDAMP, running_hessian_update
from ..result import PruneResult
from ..solvers.obs import DEFAULT_BLOCKSIZE
from ..solvers.rose import rose_layer
from ..validation import check_scaler, check_weight
from .adapter import LayerAdapter, running_scaler_update


def rose_with_scaler(
    W: torch.Tensor,
    H: torch.Tensor,
    scaler: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    range_threshold: float = 0.5,
    backend: str = "auto",
    *,
    inverse_method: str = "reference",
) -> PruneResult:
    """ROSE with the pre-pruning score `|W| * sqrt(scaler)` instead of `sqrt(diag(H)/2)`:
    `fastprune.rose_layer(..., scaler=scaler, range_rule="block_sum")` under the ROSE
    repository's argument order, with the reference's `H^-1` arithmetic by default
    (`inverse_method="reference"`). Blocks are compared by their loss sums as in the
    original, also when a short last block makes that geometry-dependent (`rose_layer`
    compares them per column there). With `scaler = diag(H)/2` the result is
    `rose_layer(..., inverse_method=inverse_method, range_rule="block_sum")`'s."""
    if not isinstance(scaler, torch.Tensor):
        raise TypeError("scaler_row must be a floating-point torch.Tensor")
    W = check_weight(W)
    check_scaler(scaler, W.shape[1], W.device)  # named scaler_row, as the adapters call it
    return rose_layer(
        W,
        H,
        sparsity,
        prune_n,
        prune_m,
        blocksize=blocksize,
        percdamp=percdamp,
        range_threshold=range_threshold,
        backend=backend,
        scaler=scaler,
        inverse_method=inverse_method,
        range_rule="block_sum",  # the original's rule, short last block included
    )


class ROSE(LayerAdapter):
    """Drop-in for the ROSE repository's `ROSE` class (`lib/prune_zoo/rose.py`).

    `add_batch(inp, out)` accumulates `H` exactly as SparseGPT does and the pre-pruning
    `scaler_row` exactly as the ROSE code does. That code scales the inputs by `sqrt(2/n)`
    before a running mean that already divides by `n`, so its `scaler_row` is
    `(2/N) * sum_k ||x_k||^2 / n_k`: calibration sample k counts with weight `1/n_k` (`n_k`
    = samples seen once its batch was added; `1/k` for one sample per batch), not equally.
    This adapter reproduces that weighting on purpose, so `fasterprune` gives the original's
    reordering and result (masks equal, weights equal to float32 rounding, stable sorts at
    exact ties). `fastprune.rose_layer` instead uses the equal-weight `diag(H)/2`.

    `fasterprune(sparsity, prune_n, prune_m, blocksize, percdamp)` writes the pruned weight
    into the layer. Where the original crashes it works: N:M on a columnar layer (groups are
    reordered as in `rose_layer`), a reordered layer whose last block is partial (blocks
    ranked by their loss sums, as the original decides whether to reorder), Conv1D
    layers (the original never transposes them back) and Conv2d inputs (unfolded as in
    SparseGPT). For N:M the original sweeps in blocks of `prune_m`; this uses `blocksize`
    rounded to a multiple of `prune_m`, which changes only float rounding.
    """

    range_threshold = 0.5

    def __init__(self, layer: nn.Module, *, backend: str = "auto") -> None:
        super().__init__(layer, backend)
        self.H = torch.zeros(self.columns, self.columns, device=self.dev)
        self.scaler_row = torch.zeros(self.columns, device=self.dev)

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        x, b = self._inputs(inp)
        running_scaler_update(self.scaler_row, self.nsamples, x, b, prescale=True)  # 1/n_k
        self.nsamples = running_hessian_update(self.H, self.nsamples, x, b)

    @torch.no_grad()
    def fasterprune(
        self, sparsity, prune_n=0, prune_m=0, blocksize=DEFAULT_BLOCKSIZE, percdamp=DEFAULT_PERCDAMP
    ):
        """Prune the layer in place; returns the `PruneResult` (`info` has the relative range
        and whether it reordered)."""
        W = self._weight().float()
        H = self._take_hessian()
        r = rose_with_scaler(
            W,
            H,
            self.scaler_row,
            sparsity,
            prune_n,
            prune_m,
            blocksize,
            percdamp,
            self.range_threshold,
            self.backend,
        )
        self._write(r)
        return r

    def free(self) -> None:
        self.H = None
        self.scaler_row = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
