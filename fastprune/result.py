"""The value every layer-level solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .masks import pruned_fraction
from .quant import QuantizedWeight


@dataclass
class PruneResult:
    """Outcome of pruning one layer.

    weight: the pruned weight, same dtype/device/shape as the input `W`.
    mask:   bool `[rows, cols]`, True = weight kept.
    loss:   reconstruction error `tr((W - W_p) H (W - W_p)^T)` in float64 arithmetic on the
            solver's float32/float64 values; with `H = 2/n sum_t x_t x_t^T` this is
            `2/n * ||(W - W_p) X||_F^2`. `None` where no `H` was given (magnitude).
    info:   what was done: method, sparsity, pattern, seconds, device, backend, `kernels`
            ({op: "torch" | "triton" | "cuda"}: the implementation that ran each op, with
            `kernel_fallbacks` saying why a backend was passed over) and the method's own
            figures (damping used, ROSE's relative range, swaps done, ...); `info["quant"]`
            the grid of a quantized layer and its relative rounding error.
    quant:  the quantized layer (codes, scales, zero points) where the solve quantized the
            kept weights (`quant=`); `weight` is then its dequantized weight in W's dtype.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float | None
    info: dict[str, Any] = field(default_factory=dict)
    quant: QuantizedWeight | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned by the mask."""
        return pruned_fraction(self.mask)

    def summary(self) -> str:
        """One line saying what was done, for logs and the CLI."""
        i = self.info
        loss = "n/a" if self.loss is None else f"{self.loss:.6g}"
        extra = []
        if "reordered" in i:
            extra.append(f"reordered={i['reordered']} range={i['relative_range']:.3f}")
        if "swaps" in i:
            extra.append(f"swaps={i['swaps']} loss_before={i['loss_before']:.6g}")
        if i.get("damp_retries"):
            extra.append(f"damp={i['damp']:.3g} (retried {i['damp_retries']}x)")
        if i.get("quant"):
            q = i["quant"]
            extra.append(
                f"quant={'fp8' if q['format'] == 'fp8' else 'int' + str(q['bits'])} "
                f"g={q['group_size']} "
                f"grid_error={q.get('grid_error', float('nan')):.3g}"
            )
        if i.get("kernels"):
            extra.append("kernels=" + ",".join(f"{k}:{v}" for k, v in i["kernels"].items()))
        tail = (" " + " ".join(extra)) if extra else ""
        return (
            f"{i.get('method', '?')} {tuple(self.weight.shape)} pattern={i.get('pattern', '?')} "
            f"sparsity={self.sparsity:.4f} loss={loss} time={i.get('seconds', float('nan')):.3f}s "
            f"device={i.get('device', self.weight.device)} backend={i.get('backend', 'torch')}"
            f"{tail}"
        )

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"PruneResult({self.summary()})"
