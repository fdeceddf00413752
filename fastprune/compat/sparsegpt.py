"""Drop-in for the IST-DASLab `SparseGPT` class."""

from __future__ import annotations

import torch
from torch import nn

from ..hessian import DEFAULT_PERCDAMP, running_hessian_update
from ..solvers.obs import DEFAULT_BLOCKSIZE
from ..solvers.sparsegpt import sparsegpt_layer
from .adapter import LayerAdapter


def _alias(value, alias, name, alias_name):
    if alias is None:
        return value
    if value not in (0, alias):
        raise TypeError(f"got both {name}={value!r} and {alias_name}={alias!r}")
    return alias


class SparseGPT(LayerAdapter):
    """Drop-in for the IST-DASLab `SparseGPT` class, solved by `fastprune.sparsegpt_layer`.

    Same interface and result: `add_batch(inp, out)` accumulates `H` (float32, as the
    reference), `fasterprune(sparsity, prunen, prunem, blocksize, percdamp)` writes the
    pruned weight into `layer.weight.data` (in the layer's dtype and layout), `free()` drops
    the Hessian. Attributes `layer`, `dev`, `rows`, `columns`, `nsamples`, `H` as the
    reference; after pruning, `result` holds the `PruneResult` (mask, loss, timing) and
    `error` the reference's printed OBS error. `H^-1` is factored with the reference's
    arithmetic (`inverse_method="reference"`). Differences: nothing is printed; a Hessian
    that will not factor is retried with more damping (reported in `result.info`) instead
    of raising; `sparsity=0` prunes nothing; the joint quantizer (`self.quantizer`) of the
    reference is not supported and raises. `backend` picks the solver backend (default: the
    fastest for the layer's device).
    """

    def __init__(self, layer: nn.Module, *, backend: str = "auto") -> None:
        super().__init__(layer, backend)
        self.H = torch.zeros(self.columns, self.columns, device=self.dev)

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None, blocksize=1024):
        """Add a batch of layer inputs (`out` and `blocksize` are unused, as in the reference)."""
        x, b = self._inputs(inp)
        self.nsamples = running_hessian_update(self.H, self.nsamples, x, b)

    @torch.no_grad()
    def fasterprune(
        self,
        sparsity,
        prunen=0,
        prunem=0,
        blocksize=DEFAULT_BLOCKSIZE,
        percdamp=DEFAULT_PERCDAMP,
        *,
        prune_n=None,
        prune_m=None,
    ):
        """Prune the layer in place; returns the `PruneResult` (the reference returns None).

        `prune_n`/`prune_m` are accepted as aliases of `prunen`/`prunem`: the copies of this
        class in the Wanda and ROSE repositories spell them so.
        """
        prunen = _alias(prunen, prune_n, "prunen", "prune_n")
        prunem = _alias(prunem, prune_m, "prunem", "prune_m")
        if hasattr(self, "quantizer"):
            raise NotImplementedError(
                "joint sparsification + quantization (SparseGPT's `quantizer`) is not "
                "supported by fastprune.compat.SparseGPT; prune first, quantize separately"
            )
        W = self._weight().float()
        H = self._take_hessian()
        r = sparsegpt_layer(
            W,
            H,
            sparsity,
            prunen,
            prunem,
            blocksize=blocksize,
            percdamp=percdamp,
            backend=self.backend,
            inverse_method="reference",  # the reference's arithmetic for H^-1
        )
        self._write(r)
        return r

    def free(self) -> None:
        self.H = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
