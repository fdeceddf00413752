"""Pre-flight: before any weight changes, one forward of one calibration sample through the real
model with every decoder block and planned layer hooked. What would not calibrate right is
refused (`ValueError` naming the block, layer or argument and why; the model unchanged): a
linear never called (used through its `.weight`) or called twice in one forward, an experts
module called in a way not understood, a block whose replay on the pipeline's arguments does
not reproduce the real forward for a reason no per-block argument fixes. Linears feeding the
expert selection are found by structure and left dense as routers; blocks that get arguments
of their own are replayed with them. A streamed model runs it with each block loaded when
called (`on_demand`)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from ..layers import ExpertProjection, get_weight
from .block_layers import BlockLayers, DenseMatrix, shared_modules
from .capture import PER_BLOCK, _block_output, _split_hidden
from .experts import expert_call_inputs, expert_call_problem
from .replay import OnDemand, differing, matrices_of, replay_block, snapshot, tensors

logger = logging.getLogger("fastprune")
ROUTER = "router: feeds the expert selection"
# routing ops -> the position of their `dim` argument
_ROUTING = {
    torch.topk: 2, torch.Tensor.topk: 2, torch.sort: 1, torch.Tensor.sort: 1,
    torch.argsort: 1, torch.Tensor.argsort: 1, torch.argmax: 1, torch.Tensor.argmax: 1,
}  # fmt: skip


class _Provenance(TorchFunctionMode):
    """Tags each tensor made in the forward with the matrices that produced it (a product with
    a block's matrix is tagged with that matrix alone; any other op takes the union of its
    inputs' tags) and with the blocks it was computed in. A routing op (top-k, sort, argmax)
    inside a block marks that block's matrices whose output width is the width it sorts."""

    def __init__(self, owners: dict, widths: dict, moe: set):
        super().__init__()
        self.owners, self.widths, self.moe = owners, widths, moe
        self.tags = WeakTensorKeyDictionary()
        self.block: int | None = None
        self.routers: set[tuple[int, str]] = set()
        self.active: set[tuple[int, str]] = set()  # layers inside their own call
        self.outside: dict[tuple[int, str], str] = {}  # weight used outside its layer's call
        self.replaying = False  # a replay inside the forward: nothing is recorded
        self.returned = None  # called with a block's index when it first returns

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = result = func(*args, **kwargs)
        if self.replaying:
            return result
        tags, made_by = set(), None
        for t in tensors((args, kwargs)):
            own = self.owners.get(id(t))
            if own is not None and own[0] is t:
                made_by = own[1:]
                if made_by not in self.active and isinstance(out, torch.Tensor):
                    self.outside.setdefault(made_by, getattr(func, "__name__", str(func)))
            else:
                tags |= self.tags.get(t, frozenset())
        if made_by is not None:
            tags = {x for x in tags if x[0] == "block"} | {("mat", *made_by)}
        if out is None and args and isinstance(args[0], torch.Tensor):
            out = args[0]  # written in place (`x[idx] = y`): x carries y's tags too
        if func in _ROUTING and self.block in self.moe:
            self._route(_ROUTING[func], args, kwargs, tags)
        if self.block is not None:
            tags.add(("block", self.block))
        if tags:
            frozen = frozenset(tags)
            for t in tensors(out if isinstance(out, tuple | list) else [out]):
                self.tags[t] = frozen
        return result

    def _route(self, pos, args, kwargs, tags) -> None:
        x = args[0] if args else kwargs.get("input")
        dim = args[pos] if len(args) > pos else kwargs.get("dim")
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return
        width = x.shape[dim if isinstance(dim, int) else -1]
        for tag in tags:
            if tag[0] == "mat" and tag[1] == self.block and self.widths.get(tag[1:]) == width:
                self.routers.add(tag[1:])


class _BlockProbe:
    """Hooks on one block and its planned layers: the block's calls with their arguments
    (copied when called) and outputs, each layer's calls, each experts module's calls and
    the first reason its calling convention is not understood."""

    def __init__(self, i: int, block: nn.Module, bl: BlockLayers, mode: _Provenance, shared=None):
        self.i, self.mode = i, mode
        self.shared = shared or {}  # layer (the block: "") -> where else the same object sits
        self.inputs: list[tuple[tuple, dict]] = []
        self.outputs: list[torch.Tensor] = []  # the first call's (until replayed)
        self.shapes: list[list[int]] = []  # of the hidden states in and out
        self.hidden: torch.Tensor | None = None
        self.replayed = None  # (tolerance, (error, failure) on its kind's arguments, on its own)
        self.depends: dict[str, set[int]] = {}  # argument -> earlier blocks its value came from
        self.calls: Counter = Counter()
        self.problems: dict[str, str] = {}
        self.handles = [
            block.register_forward_pre_hook(self._enter, with_kwargs=True),
            block.register_forward_hook(self._leave),
        ]
        fused = {}
        for name, layer in bl.layers.items():
            if isinstance(layer, ExpertProjection):
                fused[name.rpartition("[")[0].rpartition(".")[0]] = layer.experts
            else:
                self.calls[name] = 0
                self.handles += [
                    layer.register_forward_pre_hook(self._in(name)),
                    layer.register_forward_hook(self._out(name)),
                ]
        self.fused = set(fused)
        self.routed = set(bl.expert_lists)  # expert MLPs' linears: called for routed tokens
        for path, fx in fused.items():
            self.calls[path] = 0
            self.handles.append(
                fx.module.register_forward_pre_hook(self._experts(path, fx), with_kwargs=True)
            )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _enter(self, _mod, args, kwargs):
        if self.mode.replaying:
            return
        hidden, rest, kw = _split_hidden(args, kwargs)
        self.inputs.append((snapshot(rest), snapshot(kw)))
        named = [(f"positional argument {j + 1}", v) for j, v in enumerate(rest)]
        for name, value in [*named, *kw.items()]:
            found = {
                tag[1]
                for t in tensors(value)
                for tag in self.mode.tags.get(t, ())
                if tag[0] == "block" and tag[1] != self.i
            }
            if found:
                self.depends[name] = found
        if len(self.inputs) == 1:  # the first call's, of one sample, on the host
            self.hidden = hidden.detach().to("cpu", copy=True)
        self.mode.tags[hidden] = frozenset()
        self.mode.block = self.i

    def _leave(self, _mod, _args, out):
        if self.mode.replaying:
            return
        self.mode.block = None
        if not self.shapes:  # the first call
            self.outputs.append(_block_output(out).detach().to("cpu", copy=True))
            self.shapes = [list(self.hidden.shape), list(self.outputs[0].shape)]
            if self.mode.returned is not None:
                self.mode.returned(self.i)

    def _in(self, name):
        def hook(_mod, _args):
            if self.mode.replaying:
                return
            self.calls[name] += 1
            self.mode.active.add((self.i, name))

        return hook

    def _out(self, name):
        def hook(_mod, _args, _out):
            if not self.mode.replaying:
                self.mode.active.discard((self.i, name))

        return hook

    def _experts(self, path, fx):
        def hook(mod, args, kwargs):
            if self.mode.replaying:
                return
            self.calls[path] += 1
            try:
                hidden, index = expert_call_inputs(mod, args, kwargs)
                why = expert_call_problem(fx, hidden, index)
            except RuntimeError as e:
                why = str(e)
            if why is not None:
                self.problems.setdefault(path, why)

        return hook

    def check(self, where: str, batch: int) -> None:
        """Refuse (`ValueError`) a block not called once on batch-first hidden states of the
        shape it returns, or a layer not reached as planned in its forward."""
        if len(self.inputs) != 1:
            n, also = len(self.inputs), ", ".join(self.shared.get("", []))
            why = f" (one module object, also the blocks' {also}: it runs at each)" if also else ""
            why += " (not the blocks the model runs? name them: blocks=)" if n == 0 else ""
            raise ValueError(f"{where} ran {n} times in one forward of the model{why}; the "
                             "pipeline replays each block once per batch")  # fmt: skip
        shape, out = self.shapes
        if shape[0] != batch or out != shape:
            raise ValueError(
                f"{where} takes hidden states {shape} and returns {out} for a batch of "
                f"{batch}: the pipeline carries batch-first hidden states of one shape from "
                "block to block"
            )
        for name, why in self.problems.items():
            raise ValueError(f"{where}.{name} is called in a way fastprune does not read: {why}")
        for name, n in self.calls.items():
            use = self.mode.outside.get((self.i, name))
            if n == 1 or n > 1 and name in self.fused | self.routed:
                continue  # experts take every call's tokens
            if n == 0 and name in self.routed and not use:
                continue  # an expert no token was routed to (pruned with H = I)
            if n == 0:
                why = (
                    f"its weight is used directly ({use}) instead of calling the module, so "
                    "its inputs cannot be hooked"
                    if use
                    else "it is never called in the block's forward, so it gets no calibration "
                    "inputs"
                )
            elif name in self.shared:
                why = (f"it is one module object shared with {', '.join(self.shared[name])}, "
                       f"so its hooks see the calls of every place that holds it ({n} in one "
                       "forward) and it cannot be pruned for one of them")  # fmt: skip
            else:
                why = (
                    f"it is called {n} times in one forward of the block, and its hooks take "
                    "one input per block forward"
                )
            pattern = f"{name}.*" if name in self.fused else name
            raise ValueError(f"{where}.{name}: {why}; leave it dense with ignore=['{pattern}']")


@dataclass
class Verdict:
    """What the pre-flight found: routers left dense (per block), the blocks that are
    replayed with their own arguments, the largest relative replay error seen."""

    routers: dict[int, list[str]] = field(default_factory=dict)
    own_arguments: list[int] = field(default_factory=list)
    replay_error: float = 0.0

    def summary(self) -> dict:
        routers = {str(i): r for i, r in self.routers.items()}
        return {"routers": routers, "own_arguments": self.own_arguments,
                "replay_error": self.replay_error}  # fmt: skip


def has_experts(blocks, layouts) -> bool:
    """Whether any block holds experts (its routers matter even without calibration)."""
    return any(
        bl.expert_lists or any(isinstance(x, ExpertProjection) for x in bl.layers.values())
        or any("expert" in p.rpartition(".")[2] for p, _ in b.named_modules())
        for b, bl in zip(blocks, layouts)
    )  # fmt: skip


def own_kinds(kinds: list[str], verdict: Verdict) -> list[str]:
    """The block kinds with each block the verdict replays on its own arguments a kind of
    its own (`PER_BLOCK`)."""
    own = set(verdict.own_arguments)
    return [f"{PER_BLOCK}{i}" if i in own else k for i, k in enumerate(kinds)]


def _mode_for(blocks, layouts) -> _Provenance:
    owners, widths, moe = {}, {}, set()
    for i, (block, bl) in enumerate(zip(blocks, layouts)):
        owners.update(matrices_of(i, block))
        for name, layer in bl.layers.items():
            if not bl.is_expert(name):
                widths[(i, name)] = get_weight(layer).shape[0]
        if has_experts([block], [bl]):
            moe.add(i)
    return _Provenance(owners, widths, moe)


def drop_routers(i: int, bl: BlockLayers, found) -> list[str]:
    """Move the layers of block `i` found to feed the expert selection from the plan to the
    dense matrices (reason `ROUTER`); their names."""
    names = sorted(name for b, name in found if b == i and name in bl.layers)
    for name in names:
        W = get_weight(bl.layers.pop(name))
        bl.dense.append(DenseMatrix(f"{name}.weight", tuple(W.shape), ROUTER))
    return names


@torch.no_grad()
def preflight(
    model, blocks, layouts, kinds, blocks_path, sample, replay=True, on_demand=None
) -> Verdict:
    """One forward of `sample` (`[1, seqlen]` token ids) through `model` with every block
    and planned layer hooked; refuse what the pipeline would not calibrate right, leave the
    routers found dense (`layouts` revised), and with `replay`, check each block's replay on
    its kind's arguments (`kinds[i]`) against its real output: blocks that reproduce it only
    with their own arguments are listed in `Verdict.own_arguments`. `on_demand` (a streamed
    model, its blocks on the meta device): `load(i)` is called when block `i` is, `release(i)`
    once it is replayed, so at most two blocks' weights are held (the one running and the
    one before it, replayed when it returns)."""
    mode = _mode_for(blocks, layouts)
    shared = shared_modules(blocks, layouts)
    probes = [_BlockProbe(i, b, bl, mode, shared[i])
              for i, (b, bl) in enumerate(zip(blocks, layouts))]  # fmt: skip
    first, due = {k: kinds.index(k) for k in set(kinds)}, []
    demand = None if on_demand is None else OnDemand(blocks, mode, on_demand)
    release = (lambda j: None) if demand is None else demand.release

    def replay_due(now: int | None) -> None:
        """Replay the blocks that returned before block `now` (all: None), on their kind's
        arguments and, if that differs, on their own; their records (and, streamed, their
        weights) are then freed. Run once the next block returned, a replay sees the state
        the model set for that one: no more than two blocks' inputs and outputs are held."""
        for j in [j for j in due if j != now]:
            due.remove(j)
            p, mode.replaying = probes[j], True
            try:
                tol = 1e-4 if p.outputs[0].dtype in (torch.float32, torch.float64) else 2e-2
                f = probes[first[kinds[j]]].inputs[:1] or [((), {})]
                kind = replay_block(blocks[j], p.hidden, *f[0], p.outputs[0])
                own = (
                    None
                    if kind[0] <= tol
                    else replay_block(blocks[j], p.hidden, *p.inputs[0], p.outputs[0])
                )
                p.replayed, p.hidden, p.outputs = (tol, kind, own), None, p.outputs[:0]
            finally:
                mode.replaying = False
            release(j)
        if now is not None:
            due.append(now)

    mode.returned = replay_due if replay else release
    was_training = model.training
    model.eval()
    try:
        with mode:
            model(input_ids=sample, use_cache=False)
            if replay:
                replay_due(None)
    finally:
        for p in probes:
            p.remove()
        if demand is not None:
            demand.close()
        model.train(was_training)
    for i, p in enumerate(probes):
        p.check(f"{blocks_path}.{i}", sample.shape[0])
    verdict = Verdict()
    for i, bl in enumerate(layouts):
        names = drop_routers(i, bl, mode.routers)
        if names:
            verdict.routers[i] = names
    if not replay:
        return verdict
    for i, p in enumerate(probes):
        where, f = f"{blocks_path}.{i}", probes[first[kinds[i]]].inputs[0]
        tol, (err, failed), own = p.replayed
        if err <= tol:
            verdict.replay_error = max(verdict.replay_error, err)
            continue
        diff = differing(p.inputs[0], f)
        for name in diff:
            if name in p.depends:
                raise ValueError(
                    f"{where}: its argument {name} depends on the outputs of earlier blocks "
                    f"({', '.join(map(str, sorted(p.depends[name])))}), so no fixed argument "
                    "replays the block as the model runs it; fastprune cannot prune this model"
                )
        if not diff:
            raise ValueError(
                f"{where}: replayed on its own arguments, the block's output differs from the "
                f"real forward's ({failed or f'by {err:.3g}'}): it reads state that is not "
                "among its arguments"
            )
        err2, failed2 = own
        if err2 > tol:
            raise ValueError(
                f"{where}: the block's replay differs from the real forward's even with its "
                f"own arguments ({failed2 or f'{err2:.3g} relative'})"
            )
        logger.info("%s gets arguments of its own (%s): replayed with them", where, ", ".join(diff))
        verdict.own_arguments.append(i)
        verdict.replay_error = max(verdict.replay_error, err2)
    return verdict
