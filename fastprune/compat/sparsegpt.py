"""Drop-in for the IST-DASLab `SparseGPT` class."""

from __future__ import annotations

import torch
from torch import nn

from ..hessian import DEFAULT_PERCDAMP, running_hessian_update
from ..quant import QuantSpec
from ..solvers.obs import DEFAULT_BLOCKSIZE
from ..solvers.sparsegpt import sparsegpt_layer
from .adapter import LayerAdapter


def _alias(value, alias, name, alias_name):
    if alias is None:
        return value
    if value not in (0, alias):
        raise TypeError(f"got both {name}={value!r} and {alias_name}={alias!r}")
    return alias


def quantizer_spec(quantizer) -> QuantSpec:
    """The `QuantSpec` of an IST-DASLab `Quantizer` as SparseGPT's `--wbits` configures it
    (`configure(bits, perchannel=True, sym=False, mse=False)`): a per-channel grid found
    from W before the sweep, symmetric or not. Refuses, naming them, the settings the sweep
    does not offer (NotImplementedError) and a quantizer never configured (ValueError)."""
    if not hasattr(quantizer, "perchannel") or not hasattr(quantizer, "maxq"):
        raise ValueError(
            "the quantizer was never configured: call quantizer.configure(bits, "
            "perchannel=True, sym=False, mse=False) before fasterprune"
        )
    maxq = int(quantizer.maxq)
    bits = (maxq + 1).bit_length() - 1
    bad = []
    if maxq < 1 or 2**bits - 1 != maxq or not 2 <= bits <= 8:
        bad.append(f"maxq={maxq} (only 2**bits - 1 for bits in 2..8)")
    if not quantizer.perchannel:
        bad.append("perchannel=False (one grid for the whole layer)")
    if getattr(quantizer, "mse", False):
        bad.append("mse=True (the grid search by shrinking)")
    if getattr(quantizer, "grouprows", 1) != 1:
        bad.append(f"grouprows={quantizer.grouprows} (one grid per group of rows)")
    scale = getattr(quantizer, "scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() and bool((scale != 0).all()):
        bad.append("a grid already set (quantizer.ready(): the reference keeps it)")
    if bad:
        raise NotImplementedError(
            "fastprune.compat.SparseGPT does not support this quantizer: " + "; ".join(bad)
        )
    return QuantSpec(bits=bits, group_size=None, sym=bool(quantizer.sym), params="static")


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
    of raising; `sparsity=0` prunes nothing. A `quantizer` attached by the caller (the
    reference's `--wbits` joint mode) is read by `quantizer_spec` and solved by fastprune's
    joint sweep (`quant=`): each kept weight rounded to its row's grid, found from W before
    the sweep; `quantizer.scale`/`zero` then hold that grid as the reference leaves them,
    and `result.quant` the codes. `backend` picks the solver backend (default: the fastest
    for the layer's device).
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
        quantizer = getattr(self, "quantizer", None)
        spec = None if quantizer is None else quantizer_spec(quantizer)
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
            quant=spec,
        )
        if spec is not None:  # the grid find_params leaves on the reference's quantizer
            quantizer.scale = r.quant.scale.reshape(-1, 1).to(self.dev)
            quantizer.zero = r.quant.zero.to(torch.float32).reshape(-1, 1).to(self.dev)
        self._write(r)
        return r

    def free(self) -> None:
        self.H = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
