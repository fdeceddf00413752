"""Drop-in for Wanda's `WrappedGPT` (`lib/layerwrapper.py`)."""

from __future__ import annotations

import torch
from torch import nn

from ..masks import pattern_name, selection_prune_mask
from ..result import PruneResult
from ..solvers.core import wanda_score
from ..validation import check_pattern, check_sparsity
from .adapter import LayerAdapter, running_scaler_update


class WrappedGPT(LayerAdapter):
    """Drop-in for Wanda's `WrappedGPT` (`lib/layerwrapper.py`): `add_batch(inp, out)`
    keeps `scaler_row`, the running mean over samples of each input channel's squared norm
    (`||x_j||^2 / n`, which is `diag(H)/2`), and `nsamples`, `rows`, `columns`, `layer_id`,
    `layer_name`. Conv1D and Conv2d inputs are oriented/unfolded like SparseGPT's (the
    original only handles nn.Linear). `prune(sparsity, prune_n, prune_m)` applies Wanda's
    selection (`|W| * sqrt(scaler_row)`, per-row stable sort or N:M groups) in place.
    """

    def __init__(self, layer: nn.Module, layer_id=0, layer_name="none") -> None:
        super().__init__(layer, "torch")
        self.scaler_row = torch.zeros(self.columns, device=self.dev)
        self.layer_id = layer_id
        self.layer_name = layer_name

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        x, b = self._inputs(inp)
        self.nsamples = running_scaler_update(self.scaler_row, self.nsamples, x, b)

    @torch.no_grad()
    def prune(self, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> PruneResult:
        """Wanda's pruning of this layer, in place; returns the `PruneResult` (loss None:
        Wanda keeps no Hessian)."""
        W = self._weight()  # a view of layer.weight: pruned in place below, as Wanda does
        s = check_sparsity(sparsity)
        n, m = check_pattern(prune_n, prune_m, self.columns)
        if self.nsamples == 0:
            raise RuntimeError("add_batch() was never called: there is no calibration data")
        score = wanda_score(W, scaler=self.scaler_row)
        pruned = selection_prune_mask(score, s, n, m, per_row=True)
        W.masked_fill_(pruned, 0)
        info = {
            "method": "wanda",
            "sparsity": n / m if n else s,
            "pattern": pattern_name(n, m),
            "achieved_sparsity": pruned.float().mean().item(),
            "device": str(W.device),
        }
        self.result = PruneResult(W, ~pruned, None, info)
        return self.result

    def free(self) -> None:
        """Drop the statistics (the ROSE repository's Wanda wrapper has this)."""
        self.scaler_row = None
