"""One weight orientation for every layer kind: a pruned weight is `[rows, cols]` =
`[outputs, inputs]`, whatever the layer stores.

- `nn.Linear`: `weight` is `[out, in]` already;
- `transformers.Conv1D` (GPT-2): `weight` is `[in, out]`, transposed;
- `nn.Conv2d` (groups=1): `weight` `[out, in, kh, kw]` flattened to `[out, in*kh*kw]`, the
  columns an unfolded input patch multiplies;
- one expert of a fused MoE parameter (`ExpertProjection`): its slice
  `[out, in]`, or `[in, out]` where the model stores experts transposed (gpt-oss).

Used by the model pipeline and by the drop-in adapters (`fastprune.compat`). Nothing here
imports transformers: a Conv1D layer can only exist once transformers is imported.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

LAYER_KINDS = ("linear", "conv1d", "conv2d", "expert", "expert_t")
_TRANSPOSED = ("conv1d", "expert_t")


class ExpertProjection:
    """One expert's matrix inside a fused 3-D parameter, as a layer: `weight` is a view of the
    parameter's slice in its own layout; `layers.get_weight` orients it `[out, in]`."""

    def __init__(self, experts, proj: str, index: int):
        self.experts = experts
        self.proj = proj
        self.index = index

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.experts.module, self.proj)[self.index]

    @property
    def transposed(self) -> bool:
        return self.experts.transposed

    def __repr__(self) -> str:
        return f"ExpertProjection({self.proj}[{self.index}])"


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `transformers.pytorch_utils.Conv1D` (a linear layer storing `W^T` `[in, out]`),
    by its name and `nf` attribute or, once transformers is imported, as an instance of it."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        return True
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # very old transformers
        Conv1D = getattr(sys.modules["transformers"], "Conv1D", None)
    return Conv1D is not None and isinstance(module, Conv1D)


def layer_kind(layer: object) -> str:
    """'linear', 'conv1d' or 'conv2d'; `TypeError` for any other layer, `ValueError` for a
    grouped Conv2d (its weight does not act on one unfolded patch)."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(
                f"grouped Conv2d (groups={layer.groups}) is not supported: its weight does not "
                "act on one unfolded input patch"
            )
        return "conv2d"
    if isinstance(layer, nn.Module) and is_conv1d(layer):
        return "conv1d"
    if isinstance(layer, ExpertProjection):
        return "expert_t" if layer.transposed else "expert"
    raise TypeError(
        f"layer must be an nn.Linear, nn.Conv2d or transformers Conv1D, got {type(layer).__name__}"
    )


def as_matrix(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A tensor shaped like a `kind` layer's weight (the weight, its gradient) as
    `[rows, cols]`: a view."""
    if kind == "conv2d":
        return t.flatten(1)
    if kind in _TRANSPOSED:
        return t.t()
    return t


def get_weight(module: nn.Module, kind: str | None = None) -> torch.Tensor:
    """The weight as `[rows, cols]` = `[out, in]`: a view of `module.weight` (the parameter
    itself for nn.Linear). `kind` is `layer_kind(module)` when already known."""
    return as_matrix(module.weight, kind or layer_kind(module))


def to_layer_layout(W: torch.Tensor, module: nn.Module, kind: str | None = None) -> torch.Tensor:
    """A `[rows, cols]` matrix back in `module.weight`'s shape and dtype (not written)."""
    kind = kind or layer_kind(module)
    if kind in _TRANSPOSED:
        W = W.t()
    return W.reshape(module.weight.shape).to(module.weight.dtype)


@torch.no_grad()
def set_weight(module: nn.Module, W: torch.Tensor, kind: str | None = None) -> None:
    """Write a `[rows, cols]` weight into the module's own weight, in place."""
    module.weight.copy_(to_layer_layout(W, module, kind))


def is_prunable(module: nn.Module) -> bool:
    """A layer the pipeline prunes as a matrix: a linear or GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)
