"""Calibration inputs of a block's layers from forward pre-hooks: one float32 Hessian per
distinct input (`_HessianHooks`), or any other per-layer statistic (an `_InputHooks`
subclass).

Linears are hooked directly. The experts of an MoE block are hooked once per experts module:
each expert's inputs are the tokens the router sends to it (`moe_calibration="routed"`) or
every token (`"all"`, for the statistics only: the block's output still follows the router),
and each token counts as one sample, so an expert's `H` is normalised by its own token count.
"""

from __future__ import annotations

import torch
from torch import nn

from ..block_layers import BlockLayers
from ..experts import (
    ExpertProjection,
    check_moe_calibration,
    expert_call_inputs,
    expert_intermediate,
    routed_tokens,
)
from ..hessian import HessianAccumulator
from ..layers import get_weight


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


class _InputHooks:
    """Forward pre-hooks on a block's layers that hand each layer's inputs to
    `observe(name, x, per_token)`: `x [batch, tokens, cols]` for linears (`per_token=False`,
    the reference's sample count) and `[tokens, cols]` for experts (`per_token=True`: every
    token one sample). Layers fed the very same tensor (q/k/v, gate/up, a fused expert's input
    projections, all experts' under "all") form a group whose first layer, its leader, alone
    observes. Linears of experts kept as an nn.ModuleList each observe their own inputs.

    The first batch decides the groups; later batches check the sharing still holds.
    `tokens[name]`: how many tokens each expert layer received.
    """

    def __init__(self, block: nn.Module, bl: BlockLayers, moe_calibration: str = "routed"):
        self.moe_calibration = check_moe_calibration(moe_calibration)
        self.leader: dict[str, str] = {}
        self.seen: dict[str, torch.Tensor] = {}  # leader -> its input in the current batch
        self.batch = 1
        self.tokens: dict[str, int] = {}
        self.handles = []
        self._all_lists: set[str] = set()  # expert lists being run on every token right now
        fused: dict[int, list[tuple[str, ExpertProjection]]] = {}
        for name, layer in bl.layers.items():
            if isinstance(layer, ExpertProjection):
                fused.setdefault(id(layer.experts.module), []).append((name, layer))
                continue
            list_path = bl.expert_lists.get(name)
            if list_path is not None:  # an H of its own, whether or not it is ever called
                self.tokens[name] = 0
                self.leader[name] = name
            hook = self._linear_hook(name, list_path)
            self.handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        for group in fused.values():
            self.tokens.update((name, 0) for name, _ in group)
            hook = self._fused_hook(group)
            module = group[0][1].experts.module
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        if self.moe_calibration == "all":
            for list_path in sorted(set(bl.expert_lists.values())):
                self._hook_expert_list(block, list_path)

    def observe(self, name: str, x: torch.Tensor, per_token: bool) -> None:
        raise NotImplementedError

    def end_batch(self) -> None:
        self.seen.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # ------------------------------------------------------------------ linears
    def _group(self, name: str, x: torch.Tensor) -> str:
        if name not in self.leader:
            self.leader[name] = next((k for k, t in self.seen.items() if _same_tensor(t, x)), name)
        lead = self.leader[name]
        if lead != name and (lead not in self.seen or not _same_tensor(self.seen[lead], x)):
            raise RuntimeError(
                f"{name} shared the input of {lead} in the first batch but not later"
            )
        return lead

    def _linear_hook(self, name: str, list_path: str | None):
        def hook(_mod, args, kwargs):
            x = args[0] if args else kwargs["input"]
            if list_path is not None:  # a linear of an expert MLP: its tokens, one sample each
                if self.moe_calibration == "all" and list_path not in self._all_lists:
                    return  # a routed call: "all" observed every token before it
                x = x.reshape(-1, x.shape[-1])
                self.tokens[name] += x.shape[0]
                self.observe(name, x, True)
                return
            if self._group(name, x) != name:
                return
            xb = x
            if x.dim() == 2 and self.batch > 1 and x.shape[0] % self.batch == 0:
                xb = x.reshape(self.batch, -1, x.shape[-1])  # OPT flattens tokens
            elif x.dim() > 3:
                xb = x.reshape(-1, x.shape[-2], x.shape[-1])
            self.observe(name, xb, False)
            self.seen[name] = x

        return hook

    def _hook_expert_list(self, block: nn.Module, list_path: str) -> None:
        """ "all" for experts kept as an nn.ModuleList: before the module holding the list
        runs, every expert MLP runs on every token (its linears' hooks observe), then the
        routed calls pass unobserved."""
        parent_path, _, leaf = list_path.rpartition(".")
        parent = block.get_submodule(parent_path) if parent_path else block
        experts = getattr(parent, leaf)

        @torch.no_grad()
        def hook(_mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            x = x.reshape(-1, x.shape[-1])
            self._all_lists.add(list_path)
            try:
                for expert in experts:
                    expert(x)
            finally:
                self._all_lists.discard(list_path)

        self.handles.append(parent.register_forward_pre_hook(hook, with_kwargs=True))

    # ------------------------------------------------------------------ fused experts
    def _fused_hook(self, group: list[tuple[str, ExpertProjection]]):
        fx = group[0][1].experts
        names = {(layer.proj, layer.index): name for name, layer in group}

        @torch.no_grad()
        def hook(mod, args, kwargs):
            hidden, top_k = expert_call_inputs(mod, args, kwargs)
            x = hidden.reshape(-1, hidden.shape[-1])
            every = self.moe_calibration == "all"
            routes = None if every else routed_tokens(top_k, fx.num_experts)
            shared = None  # "all": every expert's input projections share one H
            for e in range(fx.num_experts):
                xe = x if every else x[routes[e]]
                lead = shared
                for p in fx.inputs:
                    name = names.get((p, e))
                    if name is None:
                        continue
                    self.tokens[name] += xe.shape[0]
                    lead = self.leader.setdefault(name, lead or name)
                    if lead == name:
                        self.observe(name, xe, True)
                shared = lead if every else None
                name = names.get(("down_proj", e))
                if name is not None:
                    self.tokens[name] += xe.shape[0]
                    self.leader.setdefault(name, name)
                    if xe.shape[0]:
                        mid = expert_intermediate(fx, e, xe)
                    else:
                        mid = xe.new_zeros(0, fx.intermediate)
                    self.observe(name, mid, True)

        return hook


class _HessianHooks(_InputHooks):
    """One float32 `H` per distinct input of the block's layers: `acc[leader]`."""

    def __init__(
        self,
        block: nn.Module,
        bl: BlockLayers,
        device,
        precision: str = "auto",
        moe_calibration: str = "routed",
    ):
        self.device = device
        self.precision = precision
        self.acc: dict[str, HessianAccumulator] = {}
        super().__init__(block, bl, moe_calibration)
        for name in bl.expert_lists:  # present (maybe empty) on every rank, called or not
            cols = get_weight(bl.layers[name]).shape[1]
            self.acc[name] = HessianAccumulator(cols, device=device, precision=precision)

    def observe(self, name: str, x: torch.Tensor, per_token: bool) -> None:
        if name not in self.acc:
            self.acc[name] = HessianAccumulator(
                x.shape[-1], device=self.device, precision=self.precision
            )
        # per token: [tokens, cols] -> [tokens, 1, cols], so every token counts as a sample
        self.acc[name].add_batch(x.unsqueeze(1) if per_token else x)
