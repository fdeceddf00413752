"""Mixture-of-experts layers: fused expert parameters and the tokens each expert sees.

transformers 5 stores the experts of an MoE block as 3-D parameters of one module
(`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`; gpt-oss stores
them transposed, `[E, H, 2I]` / `[E, I, H]`, with biases and its own gate/up layout), called
as `experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`. Each expert's matrix is
a layer of its own here (`ExpertProjection`), and its calibration inputs are recomputed from
the call's arguments: the tokens routed to it for the input projections, and the expert's own
intermediate activations (through the module's gating) for `down_proj`. This holds whichever
`experts_implementation` runs the forward, since it reads only the call's arguments and the
weights.

Older and remote code keeps experts as an `nn.ModuleList` of ordinary MLPs named `experts`:
those linears are hooked as they are called, on exactly their routed tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config.validators import MOE_CALIBRATIONS as MOE_CALIBRATIONS
from ..config.validators import check_moe_calibration as check_moe_calibration
from ..layers import ExpertProjection as ExpertProjection

# 3-D parameters of a fused experts module: the projections fed the block's hidden states,
# and the one fed the experts' intermediate activations
INPUT_PROJECTIONS = ("gate_up_proj", "gate_proj", "up_proj")
OUTPUT_PROJECTION = "down_proj"


@dataclass(frozen=True)
class FusedExperts:
    """The layout of a fused experts module: which 3-D parameters it has and how they are
    oriented (`transposed`: stored `[E, in, out]` instead of `[E, out, in]`)."""

    module: nn.Module
    num_experts: int
    inputs: tuple[str, ...]  # projections of the hidden states, in the module's order
    transposed: bool

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.inputs, OUTPUT_PROJECTION)

    @property
    def intermediate(self) -> int:
        """The width of `down_proj`'s input."""
        down = getattr(self.module, OUTPUT_PROJECTION)
        return down.shape[1] if self.transposed else down.shape[2]

    def bias(self, proj: str) -> torch.Tensor | None:
        b = getattr(self.module, f"{proj}_bias", None)
        return b if isinstance(b, torch.Tensor) and getattr(self.module, "has_bias", True) else None


def _param3(module: nn.Module, name: str) -> torch.Tensor | None:
    p = module._parameters.get(name)
    return p if p is not None and p.dim() == 3 else None


def fused_experts(module: nn.Module) -> FusedExperts | None:
    """The module's fused-expert layout, or None if it is not a fused experts module (one
    holding a 3-D `down_proj` and 3-D input projections of the same expert count)."""
    down = _param3(module, OUTPUT_PROJECTION)
    if down is None:
        return None
    inputs = tuple(n for n in INPUT_PROJECTIONS if _param3(module, n) is not None)
    if not inputs or "gate_up_proj" in inputs and len(inputs) > 1:
        return None
    first = _param3(module, inputs[0])
    if any(_param3(module, n).shape[0] != down.shape[0] for n in inputs):
        return None
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:  # [E, out, in] feeds down_proj [E, H, I]; transposed [E, I, H]:
        # the input projections read the width H that down_proj writes (a layout that fits
        # both ways, every matrix square, reads as [E, out, in])
        plain = first.shape[2] == down.shape[1]
        transposed = first.shape[1] == down.shape[2] and not plain
    return FusedExperts(module, int(down.shape[0]), inputs, bool(transposed))


def expert_call_inputs(module: nn.Module, args: tuple, kwargs: dict):
    """`(hidden [T, H], top_k_index [T, k])` of a call `experts(hidden, top_k_index, ...)`,
    positional or by keyword (gpt-oss names them `router_indices`); `(hidden, None)` for a
    module called with its inputs already grouped by expert (Llama-4: `[E * T, H]`, each
    token scaled by its router score, zero where not routed)."""
    params = list(inspect.signature(module.forward).parameters)
    bound = dict(zip(params, args))
    bound.update(kwargs)
    if not params or params[0] not in bound:
        raise RuntimeError(f"could not read the hidden states of a call to {type(module).__name__}")
    hidden = bound[params[0]]
    index = bound.get(params[1]) if len(params) > 1 else None
    return hidden, index


def expert_call_problem(fx: FusedExperts, hidden, index) -> str | None:
    """Why a call `experts(hidden, index, ...)` is not one this module understands, or None:
    the hidden states must be a float tensor as wide as the experts' inputs, and the routed
    choices an integer tensor with one row per token (None: inputs grouped by expert, one
    group per expert)."""
    proj = getattr(fx.module, fx.inputs[0])
    width = proj.shape[1] if fx.transposed else proj.shape[2]
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        return f"its first argument is {type(hidden).__name__}, not float hidden states"
    if hidden.shape[-1] != width:
        return f"its hidden states are {hidden.shape[-1]} wide, its experts read {width}"
    tokens = hidden.reshape(-1, width).shape[0]
    if index is None:
        if tokens % fx.num_experts:
            return f"it gets no routed indices and {tokens} rows, not one group per expert"
        return None
    if not isinstance(index, torch.Tensor):
        return f"its second argument is {type(index).__name__}, not routed expert indices"
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        return (
            f"its second argument holds {index.dtype} values, not integer expert indices "
            "(a module called with its tokens' weights is no routed experts module)"
        )
    if index.dim() == 0 or index.reshape(index.shape[0], -1).shape[0] != tokens:
        return f"its routed indices {list(index.shape)} do not give one row per token ({tokens})"
    return None


def grouped_tokens(hidden: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """Each expert's rows of inputs grouped by expert (`[E * T, H]`, Llama-4) that carry a
    token: the rows that are not all zero (a token the router did not send is scaled to 0)."""
    groups = hidden.reshape(num_experts, -1, hidden.shape[-1])
    return [g[g.abs().amax(1) > 0] for g in groups]


def routed_tokens(top_k_index: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """For each expert, the indices of the tokens routed to it (ascending), from the router's
    `[T, k]` choices; indices outside `[0, E)` (expert-parallel sentinels) route nowhere."""
    idx = top_k_index.reshape(top_k_index.shape[0], -1)
    tok = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx).reshape(-1)
    e = idx.reshape(-1)
    keep = (e >= 0) & (e < num_experts)
    e, tok = e[keep], tok[keep]
    order = torch.argsort(e * idx.shape[0] + tok)
    counts = torch.bincount(e, minlength=num_experts).tolist()
    return list(torch.split(tok[order], counts))


def _linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, transposed: bool):
    y = x @ W if transposed else F.linear(x, W)
    return y if b is None else y + b


def expert_intermediate(fx: FusedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `e`'s input to `down_proj` for hidden states `x [n, H]`: its input
    projection(s), bias and the module's own gating (`_apply_gate`, gpt-oss's clamped and
    interleaved GLU included), in the model's dtype, as the forward computes them."""
    mod = fx.module
    outs = [
        _linear(x, getattr(mod, p)[e], None if fx.bias(p) is None else fx.bias(p)[e], fx.transposed)
        for p in fx.inputs
    ]
    if fx.inputs == ("gate_up_proj",):
        h = outs[0]
        gate = getattr(mod, "_apply_gate", None)
        if gate is not None:
            return gate(h)
        act = getattr(mod, "act_fn", None)
        if act is None:
            raise RuntimeError(
                f"{type(mod).__name__} has a fused gate_up_proj but neither _apply_gate nor "
                "act_fn: its intermediate activations are unknown (ignore its projections)"
            )
        g, u = h.chunk(2, dim=-1)
        return act(g) * u
    act = getattr(mod, "act_fn", None)
    if act is None:
        raise RuntimeError(f"{type(mod).__name__} has no act_fn: its activations are unknown")
    if len(outs) == 2:  # separate gate_proj and up_proj
        return act(outs[0]) * outs[1]
    return act(outs[0])  # up_proj only: no gate


def expert_list_parent(path: str) -> str | None:
    """For a linear inside an `nn.ModuleList` named `experts` (`mlp.experts.3.w1`), the path
    of that list (`mlp.experts`); else None."""
    parts = path.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "experts" and parts[i + 1].isdigit():
            return ".".join(parts[: i + 1])
    return None


def dense_experts(block: nn.Module, layers, where: str) -> list[str]:
    """The experts of `block`'s fused parameters (stored `[E, out, in]`) that are not among
    `layers` (the names of the layers to prune and quantize), as `where.mlp.experts.down_proj`
    names; experts stored transposed stay fused in the checkpoint and are not listed."""
    out = []
    for rel, module in block.named_modules():
        fx = fused_experts(module)
        if fx is None or fx.transposed:
            continue
        for proj in fx.projections:
            name = f"{rel}.{proj}" if rel else proj
            if any(f"{name}[{e}]" not in layers for e in range(fx.num_experts)):
                out.append(f"{where}.{name}")
    return out


__all__ = [
    "ExpertProjection",
    "grouped_tokens",
    "FusedExperts",
    "MOE_CALIBRATIONS",
    "check_moe_calibration",
    "dense_experts",
    "expert_call_inputs",
    "expert_call_problem",
    "expert_intermediate",
    "expert_list_parent",
    "fused_experts",
    "routed_tokens",
]
