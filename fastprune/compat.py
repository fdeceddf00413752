"""Drop-in adapters: the interfaces of the pruners people already run, on fastprune's solvers.

- `SparseGPT(layer)`: the IST-DASLab `SparseGPT` class (`add_batch`, `fasterprune`, `free`).
- `ROSE(layer)`: the ROSE repository's class, including its calibration weighting.
- `WrappedGPT(layer)`: Wanda's activation-statistics wrapper (`add_batch`, `scaler_row`),
  plus `prune()` for Wanda's per-layer selection.
- `sparsify_weight(...)`: llm-compressor's SparseGPT `sparsify_weight` contract, and
  `patch_llmcompressor()` / `unpatch_llmcompressor()` to make an installed llm-compressor's
  `SparseGPTModifier` call it.

Every adapter solves with `backend="auto"` (the fastest backend for the layer's device) unless
given another backend. `nn.Linear`, `transformers.Conv1D` (weight stored transposed) and
`nn.Conv2d` (weight flattened to `[out, in*kh*kw]`, inputs unfolded into patches) are
supported. Neither transformers nor llm-compressor is imported by this module: a Conv1D layer
can only exist once transformers is imported, and llm-compressor is imported by the patch.
"""

from __future__ import annotations

import importlib
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .hessian import inverse_hessian, running_hessian_update
from .masks import pattern_name, selection_prune_mask
from .obs import OBS_OPS, block_bounds, nm_blocksize, obs_prune
from .ops import Kernels
from .result import PruneResult
from .rose import rose_layer
from .sparsegpt import sparsegpt_layer
from .validation import (
    check_backend,
    check_hessian,
    check_int,
    check_pattern,
    check_percdamp,
    check_scaler,
    check_sparsity,
    check_weight,
    compute_dtype,
)

__all__ = [
    "ROSE",
    "SparseGPT",
    "WrappedGPT",
    "patch_llmcompressor",
    "rose_with_scaler",
    "sparsify_weight",
    "unpatch_llmcompressor",
]

# ------------------------------------------------------------------------- layer helpers


def _is_conv1d(layer: nn.Module) -> bool:
    """True for a `transformers.Conv1D` (GPT-2 style, weight `[in, out]`) without importing
    transformers: such a layer can only exist if transformers is already imported."""
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # very old transformers
        Conv1D = getattr(sys.modules["transformers"], "Conv1D", None)
    return Conv1D is not None and isinstance(layer, Conv1D)


def _layer_kind(layer: object) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(
                f"grouped Conv2d (groups={layer.groups}) is not supported: its weight does not "
                "act on one unfolded input patch"
            )
        return "conv2d"
    if isinstance(layer, nn.Module) and _is_conv1d(layer):
        return "conv1d"
    raise TypeError(
        f"layer must be an nn.Linear, nn.Conv2d or transformers Conv1D, got {type(layer).__name__}"
    )


def _weight_matrix(layer: nn.Module, kind: str) -> torch.Tensor:
    """The layer's weight as `[rows, cols]` = `[outputs, inputs]` (a view, not a copy)."""
    W = layer.weight.data
    if kind == "conv2d":
        return W.flatten(1)
    if kind == "conv1d":
        return W.t()
    return W


def _to_layer_layout(W2: torch.Tensor, layer: nn.Module, kind: str) -> torch.Tensor:
    """A `[rows, cols]` matrix back in the layer's weight shape and dtype."""
    if kind == "conv1d":
        W2 = W2.t()
    return W2.reshape(layer.weight.shape).to(layer.weight.dtype)


def _input_columns(layer: nn.Module, kind: str, inp: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Layer inputs as `[cols, tokens]` and the number of samples they count for.

    As the reference wrappers: a 2-D input is one sample, otherwise the leading dimension
    counts samples; Linear/Conv1D inputs are flattened over tokens; Conv2d inputs are
    unfolded into the patches the kernel sees (`nn.Unfold`, as GPTQ and llm-compressor do).
    """
    if not isinstance(inp, torch.Tensor):
        raise TypeError(f"inp must be a torch.Tensor, got {type(inp).__name__}")
    if kind == "conv2d":
        if inp.dim() == 3:
            inp = inp.unsqueeze(0)
        if inp.dim() != 4:
            raise ValueError(f"Conv2d inputs must be [batch, C, H, W], got {tuple(inp.shape)}")
        b = inp.shape[0]
        padding = layer.padding
        if isinstance(padding, str) or layer.padding_mode != "zeros":
            # the conv pads by itself ('same'/'valid', reflect, ...): pad the same way first
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            inp = F.pad(inp, layer._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        unfold = nn.Unfold(
            layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride
        )
        x = unfold(inp).permute(1, 0, 2).flatten(1)  # [C*kh*kw, batch*patches]
        return x, b
    if inp.dim() == 2:
        inp = inp.unsqueeze(0)
    b = inp.shape[0]
    return inp.reshape(-1, inp.shape[-1]).t(), b


class _LayerAdapter:
    """Shared state of the wrappers: the layer, its orientation, `rows`/`columns`."""

    def __init__(self, layer: nn.Module, backend: str) -> None:
        self.layer = layer
        self._kind = _layer_kind(layer)
        self.dev = layer.weight.device
        self.rows, self.columns = _weight_matrix(layer, self._kind).shape
        self.backend = check_backend(backend)
        self.nsamples = 0
        self.result: PruneResult | None = None

    def _inputs(self, inp: torch.Tensor) -> tuple[torch.Tensor, int]:
        x, b = _input_columns(self.layer, self._kind, inp)
        if x.shape[0] != self.columns:
            raise ValueError(
                f"inp has {x.shape[0]} input features per token, the layer has {self.columns}"
            )
        return x.to(self.dev), b

    def _take_hessian(self) -> torch.Tensor:
        H = getattr(self, "H", None)
        if H is None:
            raise RuntimeError(
                "no Hessian: fasterprune() already ran or free() was called; "
                "create a new wrapper and call add_batch() again"
            )
        if self.nsamples == 0:
            raise RuntimeError("add_batch() was never called: there is no calibration data")
        del self.H  # as the reference: the Hessian is consumed by fasterprune
        return H

    def _write(self, r: PruneResult) -> None:
        self.layer.weight.data = _to_layer_layout(r.weight, self.layer, self._kind)
        self.result = r
        self.error = r.info.get("obs_loss_estimate", 0.0)


# ------------------------------------------------------------------------------ SparseGPT


def _alias(value, alias, name, alias_name):
    if alias is None:
        return value
    if value not in (0, alias):
        raise TypeError(f"got both {name}={value!r} and {alias_name}={alias!r}")
    return alias


class SparseGPT(_LayerAdapter):
    """Drop-in for the IST-DASLab `SparseGPT` class, solved by `fastprune.sparsegpt_layer`.

    Same interface and result: `add_batch(inp, out)` accumulates `H` (float32, as the
    reference), `fasterprune(sparsity, prunen, prunem, blocksize, percdamp)` writes the
    pruned weight into `layer.weight.data` (in the layer's dtype and layout), `free()` drops
    the Hessian. Attributes `layer`, `dev`, `rows`, `columns`, `nsamples`, `H` as the
    reference; after pruning, `result` holds the `PruneResult` (mask, loss, timing) and
    `error` the reference's printed OBS error. Differences: nothing is printed; a Hessian
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
        blocksize=128,
        percdamp=0.01,
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
        W = _weight_matrix(self.layer, self._kind).float()
        H = self._take_hessian()
        r = sparsegpt_layer(
            W, H, sparsity, prunen, prunem, blocksize, percdamp, backend=self.backend
        )
        self._write(r)
        return r

    def free(self) -> None:
        self.H = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------- ROSE


def rose_with_scaler(
    W: torch.Tensor,
    H: torch.Tensor,
    scaler: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    range_threshold: float = 0.5,
    backend: str = "auto",
) -> PruneResult:
    """ROSE with the pre-pruning score `|W| * sqrt(scaler)` instead of `sqrt(diag(H)/2)`:
    `fastprune.rose_layer(..., scaler=scaler)` under the ROSE repository's argument order.
    With `scaler = diag(H)/2` the result is `rose_layer`'s."""
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
        blocksize,
        percdamp,
        range_threshold,
        backend,
        scaler=scaler,
    )


class ROSE(_LayerAdapter):
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
    reordered as in `rose_layer`), a reordered layer whose last block is partial, Conv1D
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
        n0 = self.nsamples
        self.scaler_row *= n0 / (n0 + b)
        self.H *= n0 / (n0 + b)
        self.nsamples = n0 + b
        x = math.sqrt(2 / self.nsamples) * x.float()
        self.scaler_row += torch.norm(x, p=2, dim=1) ** 2 / self.nsamples  # the 1/n_k weight
        self.H += x.matmul(x.t())

    @torch.no_grad()
    def fasterprune(self, sparsity, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
        """Prune the layer in place; returns the `PruneResult` (`info` has the relative range
        and whether it reordered)."""
        W = _weight_matrix(self.layer, self._kind).float()
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


# ---------------------------------------------------------------------------------- Wanda


class WrappedGPT(_LayerAdapter):
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
        self.scaler_row *= self.nsamples / (self.nsamples + b)
        self.nsamples += b
        self.scaler_row += torch.norm(x.float(), p=2, dim=1) ** 2 / self.nsamples

    @torch.no_grad()
    def prune(self, sparsity: float, prune_n: int = 0, prune_m: int = 0) -> PruneResult:
        """Wanda's pruning of this layer, in place; returns the `PruneResult` (loss None:
        Wanda keeps no Hessian)."""
        W = _weight_matrix(self.layer, self._kind)
        s = check_sparsity(sparsity)
        n, m = check_pattern(prune_n, prune_m, self.columns)
        if self.nsamples == 0:
            raise RuntimeError("add_batch() was never called: there is no calibration data")
        dtype = compute_dtype(W)
        score = W.to(dtype).abs() * torch.sqrt(self.scaler_row.to(dtype)).reshape(1, -1)
        pruned = selection_prune_mask(score, s, n, m, per_row=True)
        W.masked_fill_(pruned, 0)  # a view of layer.weight: in place, as Wanda does
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


# ------------------------------------------------------------------------- llm-compressor


@torch.no_grad()
def sparsify_weight(
    module: nn.Module,
    hessians_dict: dict,
    sparsity: float,
    prune_n: int,
    prune_m: int,
    block_size: int,
    dampening_frac: float,
    preserve_sparsity_mask: bool,
    *,
    backend: str = "auto",
) -> tuple[float, torch.Tensor]:
    """llm-compressor's SparseGPT `sparsify_weight`, solved by fastprune.

    Same contract: takes (and removes) `hessians_dict[module]`, prunes `module.weight` in
    float32 without modifying the module, and returns `(loss, weight)`: the OBS error
    estimate `sum err^2 / 2` and the pruned weight in the module's shape and dtype.
    `preserve_sparsity_mask=True` keeps every weight that is already zero pruned (raising
    `ValueError` if the layer is already sparser than `sparsity`): unstructured blocks that
    are below the target extend the mask by the usual threshold, full ones keep it; N:M
    groups prune their existing zeros plus the `prune_n` lowest others; error updates never
    revive a preserved zero. Differences: a Hessian that will not factor is retried with
    more damping (llm-compressor falls back to `H^-1 = I`); `sparsity=0` (unstructured,
    no preserved mask) prunes nothing.
    """
    kind = _layer_kind(module)
    if dampening_frac is None:
        raise TypeError("dampening_frac must be a number, got None")
    W = _weight_matrix(module, kind).float()
    H = hessians_dict.pop(module)  # the original consumes the Hessian the same way
    H = H.to(W.device)
    if preserve_sparsity_mask:
        loss, Q = _sparsify_preserving(
            W, H, sparsity, prune_n, prune_m, block_size, dampening_frac, backend
        )
    else:
        r = sparsegpt_layer(
            W, H, sparsity, prune_n, prune_m, block_size, dampening_frac, backend=backend
        )
        loss, Q = r.info.get("obs_loss_estimate", 0.0), r.weight
    return float(loss), _to_layer_layout(Q, module, kind)


def _sparsify_preserving(W, H, sparsity, prune_n, prune_m, block_size, percdamp, backend):
    """SparseGPT that keeps the existing zeros of `W` pruned (llm-compressor's
    `preserve_sparsity_mask`), on the shared OBS loop. Returns `(obs_loss, pruned float32
    weight)`."""
    W = check_weight(W)
    H = check_hessian(H, W.shape[1], W.device)
    sparsity = check_sparsity(sparsity)
    n, m = check_pattern(prune_n, prune_m, W.shape[1])
    block_size = check_int(block_size, "block_size", minimum=1)
    percdamp = check_percdamp(percdamp)
    check_backend(backend)
    kernels = Kernels(backend, W.device, OBS_OPS)
    dtype = compute_dtype(W, H)
    inv = inverse_hessian(H, percdamp, dtype=dtype)
    Wc = W.to(dtype, copy=True)
    Wc[:, inv.dead] = 0
    base = Wc == 0  # True = pruned already (dead columns included, as llm-compressor)
    current = base.sum().item() / base.numel()
    if current > sparsity:
        raise ValueError(
            f"the layer is already {current:.4f} sparse, above the target sparsity "
            f"{sparsity}: lower the target or set preserve_sparsity_mask=False"
        )
    bounds = block_bounds(W.shape[1], nm_blocksize(block_size, m))
    Q, _, losses = obs_prune(Wc, inv.hinv, bounds, sparsity, n, m, kernels, preserve=base)
    return losses.sum().item(), Q


# modules whose `sparsify_weight` the SparseGPT modifier calls, newest layout first
_LLMC_MODULES = (
    "llmcompressor.modifiers.pruning.sparsegpt.base",
    "llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify",
    "llmcompressor.modifiers.obcq.base",
    "llmcompressor.modifiers.obcq.sgpt_sparsify",
)
_llmc_originals: dict[str, object] = {}


def patch_llmcompressor() -> list[str]:
    """Make an installed llm-compressor's `SparseGPTModifier` prune with fastprune.

    Replaces `sparsify_weight` in the modules the modifier looks it up from (so models,
    recipes and `oneshot` calls stay unchanged). Idempotent; `unpatch_llmcompressor()`
    restores the originals. Returns the names of the patched modules. Raises ImportError
    if llm-compressor is not installed or has no SparseGPT `sparsify_weight`.
    """
    try:
        importlib.import_module("llmcompressor")
    except ImportError as e:
        raise ImportError(
            "patch_llmcompressor() needs llm-compressor: pip install llmcompressor"
        ) from e
    patched = []
    for name in _LLMC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        current = getattr(mod, "sparsify_weight", None)
        if current is None:
            continue
        if current is not sparsify_weight:
            _llmc_originals[name] = current
            mod.sparsify_weight = sparsify_weight
        patched.append(name)
    if not patched:
        raise ImportError(
            "this llm-compressor version has no SparseGPT sparsify_weight in "
            f"{', '.join(_LLMC_MODULES)}; fastprune cannot patch it"
        )
    return patched


def unpatch_llmcompressor() -> list[str]:
    """Undo `patch_llmcompressor()`; returns the names of the restored modules."""
    restored = []
    for name, original in list(_llmc_originals.items()):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "sparsify_weight", None) is sparsify_weight:
            mod.sparsify_weight = original
            restored.append(name)
        del _llmc_originals[name]
    return restored
