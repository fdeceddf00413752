"""Calibration inputs of a block's layers from forward pre-hooks: one float32 Hessian per
distinct input (`HessianHooks`), or any other per-layer statistic (an `InputHooks`
subclass).

Linears are hooked directly. The experts of an MoE block are hooked once per experts module:
each expert's inputs are the tokens the router sends to it (`moe_calibration="routed"`) or
every token (`"all"`, for the statistics only: the block's output still follows the router),
and each token counts as one sample, so an expert's `H` is normalised by its own token count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..hessian import DiagonalAccumulator, HessianAccumulator, RunningScaler, uses_fast_hessian
from ..layers import get_weight
from .asymmetric import CrossAccumulator
from .block_layers import BlockLayers
from .experts import (
    ExpertProjection,
    check_moe_calibration,
    expert_call_inputs,
    expert_call_problem,
    expert_intermediate,
    grouped_tokens,
    routed_tokens,
)

# at most this many bytes of zero-padded expert inputs per batched Hessian GEMM
EXPERT_GEMM_BYTES = 1 << 28


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


class InputHooks:
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
        self.called: set[str] = set()  # linears called in the current batch
        self.batch = 1
        self.batch_index = 0  # batches ended so far
        self.tokens: dict[str, int] = {}
        self.handles = []
        self._all_lists: set[str] = set()  # expert lists being run on every token right now
        fused: dict[int, list[tuple[str, ExpertProjection]]] = {}
        for name, layer in bl.layers.items():
            if isinstance(layer, ExpertProjection):
                fused.setdefault(id(layer.experts.module), []).append((name, layer))
                continue
            list_path = bl.expert_lists.get(name)
            if list_path is not None:  # observed from the start (an empty batch), so it
                # exists on every rank whether or not a token is ever routed to it
                self.tokens[name] = 0
                self.leader[name] = name
                W = get_weight(layer)
                self.observe(name, W.new_zeros(0, W.shape[1]), True)
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

    def observe_experts(self, names: list[str], xs: list[torch.Tensor]) -> None:
        """The experts of one fused projection (always the same `names`, in order), each
        with its tokens `[tokens_e, cols]` of this batch."""
        for name, x in zip(names, xs):
            self.observe(name, x, True)

    def end_batch(self) -> None:
        self.seen.clear()
        self.called.clear()
        self.batch_index += 1

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
            if name in self.called:
                raise ValueError(
                    f"{name} is called twice in one forward of its block; its hooks keep one "
                    f"input per forward (leave it dense with ignore=['{name}'])"
                )
            self.called.add(name)
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
            why = expert_call_problem(fx, hidden, top_k)
            if why is not None:
                raise ValueError(f"{type(mod).__name__} is called in a way not understood: {why}")
            x = hidden.reshape(-1, hidden.shape[-1])
            every = self.moe_calibration == "all"
            if top_k is None:  # inputs grouped by expert, scaled by the router (Llama-4)
                if every:
                    raise ValueError(
                        f"moe_calibration='all' needs the block's tokens, but "
                        f"{type(mod).__name__} receives them already routed and scaled by "
                        "the router; use moe_calibration='routed'"
                    )
                grouped = grouped_tokens(x, fx.num_experts)
            else:
                routes = None if every else routed_tokens(top_k, fx.num_experts)
            shared = None  # "all": every expert's input projections share one H
            ins, downs = ([], []), ([], [])  # (leader names, their inputs) per kind
            for e in range(fx.num_experts):
                xe = grouped[e] if top_k is None else x if every else x[routes[e]]
                lead = shared
                for p in fx.inputs:
                    name = names.get((p, e))
                    if name is None:
                        continue
                    self.tokens[name] += xe.shape[0]
                    lead = self.leader.setdefault(name, lead or name)
                    if lead == name:
                        ins[0].append(name)
                        ins[1].append(xe)
                shared = lead if every else None
                name = names.get(("down_proj", e))
                if name is not None:
                    self.tokens[name] += xe.shape[0]
                    self.leader.setdefault(name, name)
                    if xe.shape[0]:
                        mid = expert_intermediate(fx, e, xe)
                    else:
                        mid = xe.new_zeros(0, fx.intermediate)
                    downs[0].append(name)
                    downs[1].append(mid)
            for group in (ins, downs):
                if group[0]:
                    self.observe_experts(*group)

        return hook


class HessianHooks(InputHooks):
    """One float32 `H` per distinct input of the block's layers: `acc[leader]`; with
    `kind="diagonal"`, only its diagonal (a `DiagonalAccumulator`). With `scaler=True`, also
    the ROSE repository's running scaler of that input (`scalers[leader]`, a
    `RunningScaler`), from the same batches in the same order. With `held_out_every=k`,
    every k-th batch (batches k-1, 2k-1, ...) is also accumulated on its own into `held`,
    the held-out slice whose split `held_out_pair` gives (damping chosen per layer)."""

    def __init__(
        self,
        block: nn.Module,
        bl: BlockLayers,
        device,
        precision: str = "auto",
        moe_calibration: str = "routed",
        kind: str = "full",
        scaler: bool = False,
        held_out_every: int = 0,
    ):
        if kind not in ("full", "diagonal"):
            raise ValueError(f"kind must be 'full' or 'diagonal', got {kind!r}")
        if held_out_every and (kind != "full" or held_out_every < 2):
            raise ValueError(
                f"held_out_every={held_out_every} needs kind='full' and at least 2 batches"
            )
        self.held_out_every = held_out_every
        self.held: dict[str, HessianAccumulator] | None = {} if held_out_every else None
        self.device = device
        self.precision = precision
        self.kind = kind
        self.acc: dict[str, HessianAccumulator | DiagonalAccumulator] = {}
        self.stacks: dict[str, torch.Tensor] = {}  # a fused projection's experts' Hs
        self.scalers: dict[str, RunningScaler] | None = {} if scaler else None
        super().__init__(block, bl, moe_calibration)

    def release(self, lead: str) -> None:
        """Free what was accumulated for input `lead` (its last layer is solved)."""
        self.acc[lead].H = None
        if self.scalers is not None:
            self.scalers[lead].scaler_row = None
        if self.held is not None:
            self.held.pop(lead, None)

    def _holding(self) -> bool:
        """Whether the current batch belongs to the held-out slice."""
        k = self.held_out_every
        return bool(k) and self.batch_index % k == k - 1

    def _observe_held(self, name: str, x: torch.Tensor) -> None:
        """The held-out slice's H of input `name` (`x [batch, tokens, cols]`)."""
        if name not in self.held:
            self.held[name] = HessianAccumulator(
                x.shape[-1], device=self.device, precision=self.precision
            )
        self.held[name].add_batch(x)

    def held_out_pair(self, lead: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(H_fit, H_held)` of input `lead`: the H of the samples outside the held-out slice
        (`(n H - k H_held) / (n - k)`, `n` samples in all, `k` held out) and the slice's own;
        None without held-out batches, or where either side has no sample."""
        if self.held is None or lead not in self.held:
            return None
        acc, held = self.acc[lead], self.held[lead]
        n, k = acc.nsamples, held.nsamples
        if k == 0 or k >= n:
            return None
        H_held = held.H.to(acc.H.dtype)
        return (acc.H * n - H_held * k) / (n - k), H_held

    def observe(self, name: str, x: torch.Tensor, per_token: bool) -> None:
        if name not in self.acc and self.kind == "diagonal":
            self.acc[name] = DiagonalAccumulator(x.shape[-1], device=self.device)
        elif name not in self.acc:
            self.acc[name] = HessianAccumulator(
                x.shape[-1], device=self.device, precision=self.precision
            )
        # per token: [tokens, cols] -> [tokens, 1, cols], so every token counts as a sample
        self.acc[name].add_batch(x.unsqueeze(1) if per_token else x)
        self._observe_scaler(name, x.unsqueeze(1) if per_token else x)
        if self._holding():
            self._observe_held(name, x.unsqueeze(1) if per_token else x)

    def _observe_scaler(self, name: str, x: torch.Tensor) -> None:
        """The running scaler of input `name`, where asked, from the batch `x` just added
        to its `H` (inputs as `[batch, tokens, cols]`)."""
        if self.scalers is None:
            return
        if name not in self.scalers:
            self.scalers[name] = RunningScaler(x.shape[-1], device=self.device)
        self.scalers[name].add_batch(x)

    def observe_experts(self, names: list[str], xs: list[torch.Tensor]) -> None:
        """Every expert's `H` of one projection in one stacked tensor `[E, cols, cols]`
        (each accumulator's `H` a view of it), updated by one batched GEMM over the experts'
        tokens, zero-padded to the longest: the reference's arithmetic per expert (`H *=
        n/(n+b)`, inputs scaled by `sqrt(2/(n+b))`, `H += x^T x`, float32). Where that
        arithmetic does not apply (half-precision inputs that take the fast path, an update
        near float32's range) the experts are updated one by one; diagonals always are."""
        if self.kind == "diagonal":
            super().observe_experts(names, xs)
            return
        for name, x in zip(names, xs):
            self._observe_scaler(name, x.unsqueeze(1))
            if self._holding():
                self._observe_held(name, x.unsqueeze(1))
        key = names[0]
        if key not in self.stacks:
            cols = xs[0].shape[-1]
            stack = torch.zeros(len(names), cols, cols, device=self.device)
            for j, name in enumerate(names):
                self.acc[name] = HessianAccumulator(
                    cols, device=self.device, precision=self.precision
                )
                self.acc[name].H = stack[j]
            self.stacks[key] = stack
        stack = self.stacks[key]
        accs = [self.acc[name] for name in names]
        b = [x.shape[0] for x in xs]
        longest = max(b)
        if longest == 0:
            return
        if any(uses_fast_hessian(self.precision, x) for x in xs) or not self._in_range(stack, xs):
            for acc, x in zip(accs, xs):
                acc.add_batch(x.unsqueeze(1))
            return
        total = [a.nsamples + k for a, k in zip(accs, b)]
        keep = torch.tensor([a.nsamples / t if t else 1.0 for a, t in zip(accs, total)])
        scale = [math.sqrt(2 / t) if t else 0.0 for t in total]
        stack.mul_(keep.to(stack)[:, None, None])
        step = max(1, EXPERT_GEMM_BYTES // (4 * longest * stack.shape[-1]))
        for j0 in range(0, len(xs), step):
            part = range(j0, min(j0 + step, len(xs)))
            X = torch.zeros(len(part), longest, stack.shape[-1], device=self.device)
            for j in part:
                if b[j]:
                    X[j - j0, : b[j]] = scale[j] * xs[j].to(device=self.device, dtype=torch.float32)
            stack[j0 : j0 + len(part)].baddbmm_(X.transpose(1, 2), X)
        for a, t in zip(accs, total):
            a.nsamples = t

    @staticmethod
    def _in_range(stack, xs) -> bool:
        """Whether every expert's update stays well inside float32 (one host sync for all);
        NaN/inf in the inputs also fails here, so the one-by-one path reports them."""
        peaks = [torch.linalg.vector_norm(x, float("inf")) for x in xs if x.shape[0]]
        xmax, hmax = torch.stack(
            [torch.stack(peaks).amax().double(), stack.diagonal(dim1=1, dim2=2).amax().double()]
        ).tolist()
        longest = max(x.shape[0] for x in xs)
        lim = torch.finfo(stack.dtype).max / 4
        return math.isfinite(xmax) and hmax + 2 * xmax * xmax * longest <= lim


class PairedHessianHooks(HessianHooks):
    """`HessianHooks` that also accumulate, per distinct input, the cross term
    `C = 2/n sum x_dense^T x` with the dense model's inputs of the same tokens (`cross[leader]`,
    a `CrossAccumulator`; see `fastprune.pipeline.asymmetric`). Each batch runs twice
    (`run_block_paired`): with `recording` set, on the dense model's inputs, whose layer inputs
    are kept; then on the pruned model's, which update `H` and `C`. Linears only."""

    def __init__(self, *args, **kwargs):
        self.recording = False
        self.dense: dict[str, torch.Tensor] = {}
        self.cross: dict[str, CrossAccumulator] = {}
        super().__init__(*args, **kwargs)
        if self.kind != "full":
            raise ValueError("asymmetric calibration needs the full H (kind='full')")
        if self.held is not None:  # each batch runs twice here: no held-out slice
            raise ValueError("asymmetric calibration takes no held-out slice")

    def observe(self, name: str, x: torch.Tensor, per_token: bool) -> None:
        if per_token:
            raise ValueError(f"{name}: asymmetric calibration pairs no expert's tokens")
        if self.recording:
            self.dense[name] = x
            return
        xd = self.dense.pop(name, None)
        if xd is None:
            raise RuntimeError(f"{name} saw no dense input for this batch")
        super().observe(name, x, per_token)
        if name not in self.cross:
            self.cross[name] = CrossAccumulator(x.shape[-1], self.device)
        self.cross[name].add_batch(xd, x)

    def end_batch(self) -> None:
        super().end_batch()
        if not self.recording:
            self.dense.clear()

    def release(self, lead: str) -> None:
        super().release(lead)
        self.cross.pop(lead, None)
