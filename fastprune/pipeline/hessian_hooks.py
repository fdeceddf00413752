"""One float32 Hessian per distinct input of a block's linear layers, from forward pre-hooks."""

from __future__ import annotations

import torch
from torch import nn

from ..hessian import HessianAccumulator


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


class _HessianHooks:
    """Forward pre-hooks on a block's linears: one float32 `H` per distinct input tensor.

    The first batch decides the groups: a layer whose input is the very tensor an earlier
    layer of the same forward got (q/k/v, gate/up) joins that layer's group; later batches
    only accumulate through the group's first layer and check the sharing still holds.
    """

    def __init__(self, linears: dict[str, nn.Module], device, precision: str = "auto"):
        self.device = device
        self.precision = precision
        self.leader: dict[str, str] = {}
        self.acc: dict[str, HessianAccumulator] = {}
        self.seen: dict[str, torch.Tensor] = {}  # leader -> its input in the current batch
        self.batch = 1
        self.handles = [
            m.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name, m in linears.items()
        ]

    def _hook(self, name):
        def hook(_mod, args, kwargs):
            x = args[0] if args else kwargs["input"]
            if name not in self.leader:
                lead = next((k for k, t in self.seen.items() if _same_tensor(t, x)), name)
                self.leader[name] = lead
            lead = self.leader[name]
            if lead == name:
                if name not in self.acc:
                    self.acc[name] = HessianAccumulator(
                        x.shape[-1], device=self.device, precision=self.precision
                    )
                xb = x
                if x.dim() == 2 and self.batch > 1 and x.shape[0] % self.batch == 0:
                    xb = x.reshape(self.batch, -1, x.shape[-1])  # OPT flattens tokens
                elif x.dim() > 3:
                    xb = x.reshape(-1, x.shape[-2], x.shape[-1])
                self.acc[name].add_batch(xb)
                self.seen[name] = x
            elif lead not in self.seen or not _same_tensor(self.seen[lead], x):
                raise RuntimeError(
                    f"{name} shared the input of {lead} in the first batch but not later"
                )

        return hook

    def end_batch(self):
        self.seen.clear()

    def remove(self):
        for h in self.handles:
            h.remove()
