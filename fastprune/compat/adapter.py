"""What the drop-in adapters share: the layer's geometry (`fastprune.layers` orientation,
Conv2d inputs unfolded into patches), the calibration inputs as columns, the running
activation statistics, and `LayerAdapter`, the base of `SparseGPT`, `ROSE`, `WrappedGPT`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..hessian import running_scaler_update as running_scaler_update  # the adapters' name
from ..layers import get_weight, layer_kind, to_layer_layout
from ..result import PruneResult
from ..validation import check_backend


def input_columns(layer: nn.Module, kind: str, inp: torch.Tensor) -> tuple[torch.Tensor, int]:
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


class LayerAdapter:
    """Shared state of the wrappers: the layer, its orientation, `rows`/`columns`."""

    def __init__(self, layer: nn.Module, backend: str) -> None:
        self.layer = layer
        self._kind = layer_kind(layer)
        self.dev = layer.weight.device
        self.rows, self.columns = get_weight(layer, self._kind).shape
        self.backend = check_backend(backend)
        self.nsamples = 0
        self.result: PruneResult | None = None

    def _inputs(self, inp: torch.Tensor) -> tuple[torch.Tensor, int]:
        x, b = input_columns(self.layer, self._kind, inp)
        if x.shape[0] != self.columns:
            raise ValueError(
                f"inp has {x.shape[0]} input features per token, the layer has {self.columns}"
            )
        return x.to(self.dev), b

    def _weight(self) -> torch.Tensor:
        """The layer's weight as `[rows, cols]`: a view of its storage, outside autograd."""
        return get_weight(self.layer, self._kind).detach()

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
        self.layer.weight.data = to_layer_layout(r.weight, self.layer, self._kind)
        self.result = r
        self.error = r.info.get("obs_loss_estimate", 0.0)
