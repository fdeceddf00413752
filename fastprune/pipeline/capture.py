"""Capture and replay of decoder-block inputs (step 1 in `fastprune.pipeline`'s docstring):
the first block's inputs and the arguments the model passes each kind of block, recorded by
forward pre-hooks; every block replayed on them with its own kind's arguments."""

from __future__ import annotations

import contextlib
import math

import torch

from ..models import model_device

# the kind of a block replayed with the arguments the model passes it alone (`block:3`)
PER_BLOCK = "block:"


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def to_device(obj, device):
    """Move tensors inside nested args/kwargs; cache objects become None (cache disabled)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if "Cache" in type(obj).__name__:
        return None
    return obj


def _same_structure(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, tuple | list):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_same_structure(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_same_structure(a[k], b[k]) for k in a)
        )
    return a is b or a == b


def _sanitize_kwargs(kwargs: dict) -> dict:
    out = dict(kwargs)
    for k in ("past_key_value", "past_key_values", "layer_past"):
        if k in out:
            out[k] = None
    if "use_cache" in out:
        out["use_cache"] = False
    if "output_attentions" in out:
        out["output_attentions"] = False
    return out


def block_kinds(model, nblocks: int) -> list[str]:
    """The kind of each decoder block as the model wires it (`config.layer_types`, e.g.
    Gemma-2/3's sliding vs full attention): blocks of one kind get the same arguments (mask,
    position embeddings) from the model's decoder loop, blocks of different kinds may not."""
    cfg = getattr(model, "config", None)
    types = getattr(cfg, "layer_types", None) or getattr(
        getattr(cfg, "text_config", None), "layer_types", None
    )
    if not types or len(set(types)) == 1:
        return ["all"] * nblocks
    if len(types) < nblocks:
        raise ValueError(
            f"{type(model).__name__}.config.layer_types names {len(types)} layers but the "
            f"model has {nblocks} decoder blocks"
        )
    return [str(t) for t in types[:nblocks]]


# ------------------------------------------------------------------ capture and replay


class Activations:
    """Calibration activations between blocks plus the arguments each batch was called with,
    per block kind (stored once per distinct value: identical masks / position embeddings
    are shared)."""

    def __init__(self, n, shape_tail, dtype, store):
        self.inps = torch.empty((n, *shape_tail), dtype=dtype, device=store)
        self.outs = torch.empty_like(self.inps)
        self.arg_sets: list[tuple[tuple, dict]] = []
        self.batch_args: dict[str, list[int]] = {}  # kind -> index into arg_sets per batch

    def add_args(self, kind, args, kwargs) -> None:
        slots = self.batch_args.setdefault(kind, [])
        for i, (a, k) in enumerate(self.arg_sets):
            if _same_structure(a, args) and _same_structure(k, kwargs):
                slots.append(i)
                return
        self.arg_sets.append((args, kwargs))
        slots.append(len(self.arg_sets) - 1)

    def swap(self):
        self.inps, self.outs = self.outs, self.inps

    def twin(self) -> Activations:
        """A second set of activations starting from a copy of these inputs, with the same
        batches' arguments (asymmetric calibration's dense stream)."""
        other = Activations.__new__(Activations)
        other.inps = self.inps.clone()
        other.outs = torch.empty_like(self.inps)
        other.arg_sets, other.batch_args = self.arg_sets, self.batch_args
        return other

    @property
    def nbytes(self) -> int:
        return 2 * self.inps.numel() * self.inps.element_size()


def _activation_store(device, nbytes, offload) -> torch.device:
    if offload is True or device.type != "cuda":
        return torch.device("cpu") if offload is True else device
    if offload is False:
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes < free / 4 else torch.device("cpu")


def _split_hidden(args, kwargs) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, other positional args, keyword args) of a block call."""
    kwargs = dict(kwargs)
    if args:
        return args[0], tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        return kwargs.pop("hidden_states"), (), kwargs
    raise RuntimeError("could not find the hidden states passed to a decoder block")


@torch.no_grad()
def _forward_until(model, blocks, input_ids, at: list[int]) -> dict[int, tuple]:
    """Run `model` on `input_ids` and record the (args, kwargs) each block in `at` is called
    with; the forward stops at the last of them, so only the blocks before it run."""
    stop_at = max(at)
    got: dict = {}

    def hook_for(i):
        def hook(_mod, args, kwargs):
            got[i] = (args, kwargs)
            if i == stop_at:
                raise _StopForward

        return hook

    handles = [blocks[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in at]
    try:
        with contextlib.suppress(_StopForward):
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in at if i not in got]
    if missing:
        raise RuntimeError(f"the model's forward never called its decoder block {missing[0]}")
    return got


@torch.no_grad()
def capture_inputs(model, blocks, kinds, calib, batch_size, device, offload) -> Activations:
    """Inputs of the first block for every calibration batch, with the arguments the model
    passed it. For models whose blocks come in kinds (`block_kinds`), the arguments of the
    first block of each other kind are taken from one forward per batch size (they depend on
    the batch's shape only, since no padding mask is passed); only blocks before that one
    run, on that one batch. Blocks of a kind of their own (`PER_BLOCK`: arguments that
    depend on the tokens, like per-layer inputs) have theirs taken from every batch."""
    home = model_device(model)
    first_of: dict[str, int] = {}
    for i, k in enumerate(kinds):
        first_of.setdefault(k, i)
    others = sorted(i for i in first_of.values() if i != 0)
    acts = None
    by_size: dict[int, dict[int, tuple]] = {}
    for s in range(0, calib.shape[0], batch_size):
        ids = calib[s : s + batch_size].to(home)
        hidden, rest, kwargs = _split_hidden(*_forward_until(model, blocks, ids, [0])[0])
        if acts is None:
            n, tail = calib.shape[0], tuple(hidden.shape[1:])
            nbytes = 2 * n * math.prod(tail) * hidden.element_size()
            store = _activation_store(device, nbytes, offload)
            acts = Activations(n, tail, hidden.dtype, store)
        acts.inps[s : s + hidden.shape[0]] = hidden.to(acts.inps.device)
        acts.add_args(kinds[0], to_device(rest, "cpu"), to_device(_sanitize_kwargs(kwargs), "cpu"))
        if others:
            if any(kinds[i].startswith(PER_BLOCK) for i in others):
                got = _forward_until(model, blocks, ids, others)
            elif ids.shape[0] not in by_size:
                got = by_size[ids.shape[0]] = _forward_until(model, blocks, ids, others)
            else:
                got = by_size[ids.shape[0]]
            for i in others:
                _, rest, kwargs = _split_hidden(*got[i])
                acts.add_args(
                    kinds[i], to_device(rest, "cpu"), to_device(_sanitize_kwargs(kwargs), "cpu")
                )
    return acts


def _block_output(out):
    if isinstance(out, tuple | list):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise RuntimeError(f"a decoder block returned {type(out).__name__}, not hidden states")
    return out


@torch.no_grad()
def run_block(block, acts: Activations, batch_size, device, arg_sets, kind, hooks=None, store=None):
    """Run `block` on every calibration batch with its kind's arguments. The outputs go to
    `acts.outs` (`store`, by default only without `hooks`); with `hooks` (an `InputHooks`)
    each batch's size is announced to them and its end marked."""
    store = hooks is None if store is None else store
    total = acts.inps.shape[0]
    for bi, s in enumerate(range(0, total, batch_size)):
        args, kwargs = arg_sets[acts.batch_args[kind][bi]]
        x = acts.inps[s : s + batch_size].to(device)
        if hooks is not None:
            hooks.batch = min(batch_size, total - s)
        out = block(x, *args, **kwargs)
        if hooks is not None:
            hooks.end_batch()
        if store:
            out = _block_output(out)
            acts.outs[s : s + out.shape[0]] = out.to(acts.outs.device)


@torch.no_grad()
def run_block_paired(
    block, dense: Activations, acts: Activations, batch_size, device, arg_sets, kind, hooks
):
    """Asymmetric calibration's forward of a still dense `block`: per batch, first on the
    dense model's inputs (`hooks.recording`: each layer's input kept; the block's outputs go
    to `dense.outs`), then on the pruned model's, whose layer inputs `hooks` pair with them."""
    total = acts.inps.shape[0]
    for bi, s in enumerate(range(0, total, batch_size)):
        args, kwargs = arg_sets[acts.batch_args[kind][bi]]
        hooks.batch = min(batch_size, total - s)
        hooks.recording = True
        out = _block_output(block(dense.inps[s : s + batch_size].to(device), *args, **kwargs))
        hooks.end_batch()
        dense.outs[s : s + out.shape[0]] = out.to(dense.outs.device)
        hooks.recording = False
        block(acts.inps[s : s + batch_size].to(device), *args, **kwargs)
        hooks.end_batch()
