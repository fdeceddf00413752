"""Model-level one-shot pruning: sequential, block by block, the way SparseGPT and Wanda do it.

1. The inputs of the first decoder block are captured with a forward pre-hook that raises a
   sentinel (so nothing past the embeddings runs), together with the positional and keyword
   arguments the model itself passed (attention mask, position embeddings, ...). Every block
   is replayed with those arguments, which keeps the pipeline independent of how a given
   transformers version wires its decoder loop. Models whose blocks come in kinds that get
   different arguments (`config.layer_types`: Gemma-2/3's sliding vs full attention) have
   the arguments of each kind's first block captured too, and each block is replayed with
   its own kind's.
2. For each block (moved alone to `device`): one forward pass over the calibration
   activations with pre-hooks on its linear layers accumulates one float32 `H` per distinct
   input (layers fed the very same tensor, q/k/v or gate/up, share one `H` and, for
   SparseGPT, one inverse); each linear is pruned; the block is run again so the next block
   sees the pruned block's outputs; the block goes back where it was.
3. GBLM first runs real backward passes over the calibration samples (one sample at a time,
   whole model on `device`) and accumulates the per-weight l1/l2 gradient norm in a float32
   buffer per pruned weight, from a hook that frees each gradient as soon as it is added.

Memory for calibration activations: two `[nsamples, seqlen, hidden]` buffers in the model's
dtype (inputs and outputs of the current block), on `device` when they fit comfortably
(CUDA: under a quarter of the free memory) else on CPU; the report states the bytes.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .hessian import HessianAccumulator, inverse_hessian
from .masks import check_nm_keep_mask, pattern_name
from .models import (
    check_selection,
    find_blocks,
    find_linears,
    get_weight,
    model_device,
    set_weight,
)
from .rose import rose_layer
from .scores import GradientNormAccumulator, gblm_layer, magnitude_layer, wanda_layer
from .sparsegpt import sparsegpt_layer
from .sparseswaps import sparseswaps_layer
from .validation import check_int, check_pattern, check_sparsity

METHODS = ("magnitude", "wanda", "sparsegpt", "rose", "gblm", "sparseswaps")
METHOD_OPTIONS = {
    "magnitude": {},
    "wanda": {},
    "sparsegpt": {"blocksize": 128, "percdamp": 0.01, "backend": "auto"},
    "rose": {"blocksize": 128, "percdamp": 0.01, "range_threshold": 0.5, "backend": "auto"},
    "gblm": {"alpha": 1.0, "norm": "l2", "scale": 100.0, "gradients": None},
    "sparseswaps": {"max_swaps": "auto", "reconstruct": False, "percdamp": 0.01, "backend": "auto"},
}
# max_swaps="auto" on CPU: as many SparseSwaps steps as fit in this many pair evaluations
# per layer (the torch reference scans rows x kept x pruned pairs per step, ~0.2e9/s on two
# cores), at least 1 and at most CPU_MAX_SWAPS; on GPU "auto" runs until no row improves.
CPU_SWAP_PAIR_BUDGET = 3e8
CPU_MAX_SWAPS = 100


def auto_max_swaps(rows: int, cols: int, prune_m: int, device: torch.device) -> int | None:
    if device.type != "cpu":
        return None
    pairs = rows * cols * (prune_m if prune_m else cols)
    return int(min(CPU_MAX_SWAPS, max(1, CPU_SWAP_PAIR_BUDGET // pairs)))


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


# ----------------------------------------------------------------------------- the report


@dataclass
class LayerReport:
    name: str
    block: int
    shape: tuple[int, int]
    method: str
    sparsity: float
    loss: float | None
    seconds: float
    hessian: str | None  # the layer whose input H this layer shares (itself if none)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneReport:
    """What `prune_model` did: per linear layer and in total (`to_dict()` is JSON-ready)."""

    method: str
    sparsity: float
    pattern: str
    nsamples: int
    seqlen: int
    device: str
    seconds: float = 0.0
    achieved_sparsity: float = 0.0
    layers: list[LayerReport] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [dict(asdict(lr), shape=list(lr.shape)) for lr in self.layers]
        return _jsonable(d)

    def by_kind(self) -> list[dict]:
        """Aggregates per layer kind (`self_attn.q_proj`, ...), in first-seen order."""
        rows: dict[str, dict] = {}
        for lr in self.layers:
            r = rows.setdefault(
                lr.name.split(".", 1)[1] if "." in lr.name else lr.name,
                {"layers": 0, "params": 0, "pruned": 0.0, "loss": 0.0, "seconds": 0.0},
            )
            n = lr.shape[0] * lr.shape[1]
            r["layers"] += 1
            r["params"] += n
            r["pruned"] += lr.sparsity * n
            r["loss"] += lr.loss or 0.0
            r["seconds"] += lr.seconds
        for k, r in rows.items():
            r["kind"] = k
            r["sparsity"] = r.pop("pruned") / max(1, r["params"])
        return list(rows.values())

    def summary(self) -> str:
        """A short table per layer kind plus totals."""
        lines = [
            f"{'layer kind':<24} {'n':>3} {'shape':>12} {'sparsity':>8} {'loss':>11} {'sec':>7}"
        ]
        shapes = {}
        for lr in self.layers:
            shapes.setdefault(lr.name.split(".", 1)[-1], f"{lr.shape[0]}x{lr.shape[1]}")
        for r in self.by_kind():
            lines.append(
                f"{r['kind']:<24} {r['layers']:>3} {shapes.get(r['kind'], ''):>12} "
                f"{r['sparsity']:>8.4f} {r['loss']:>11.4g} {r['seconds']:>7.2f}"
            )
        t = self.totals
        lines.append(
            f"{self.method} {self.pattern} target sparsity {self.sparsity:.2f}: achieved "
            f"{self.achieved_sparsity:.4f} over {t.get('params', 0):,} weights in "
            f"{len(self.layers)} layers; {self.seconds:.1f}s on {self.device} "
            f"(solve {t.get('solve_seconds', 0):.1f}s, forward {t.get('forward_seconds', 0):.1f}s"
            + (f", gradients {t['gradient_seconds']:.1f}s" if "gradient_seconds" in t else "")
            + ")"
        )
        return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= 16 else f"tensor{tuple(x.shape)}"
    if isinstance(x, torch.dtype | torch.device):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


# --------------------------------------------------------------------- argument handling


def _check_method(method, options: dict) -> dict:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    allowed = METHOD_OPTIONS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) or "no options"
        raise TypeError(f"method {method!r} does not take {', '.join(unknown)}; it takes {takes}")
    opts = dict(allowed)
    opts.update(options)
    if method == "gblm" and opts["norm"] not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {opts['norm']!r}")
    if method == "sparseswaps" and opts["max_swaps"] not in ("auto", None):
        opts["max_swaps"] = check_int(opts["max_swaps"], "max_swaps", minimum=0)
    return opts


def _check_device(device, home: torch.device) -> torch.device:
    if device is None:
        return home
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _to(obj, device):
    """Move tensors inside nested args/kwargs; cache objects become None (cache disabled)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
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


class _Activations:
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
def _capture(model, blocks, kinds, calib, batch_size, device, offload) -> _Activations:
    """Inputs of the first block for every calibration batch, with the arguments the model
    passed it. For models whose blocks come in kinds (`block_kinds`), the arguments of the
    first block of each other kind are taken from one forward per batch size (they depend on
    the batch's shape only, since no padding mask is passed); only blocks before that one
    run, on that one batch."""
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
            acts = _Activations(n, tail, hidden.dtype, store)
        acts.inps[s : s + hidden.shape[0]] = hidden.to(acts.inps.device)
        acts.add_args(kinds[0], _to(rest, "cpu"), _to(_sanitize_kwargs(kwargs), "cpu"))
        if others:
            if ids.shape[0] not in by_size:
                by_size[ids.shape[0]] = _forward_until(model, blocks, ids, others)
            got = by_size[ids.shape[0]]
            for i in others:
                _, rest, kwargs = _split_hidden(*got[i])
                acts.add_args(kinds[i], _to(rest, "cpu"), _to(_sanitize_kwargs(kwargs), "cpu"))
    return acts


def _block_output(out):
    if isinstance(out, tuple | list):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise RuntimeError(f"a decoder block returned {type(out).__name__}, not hidden states")
    return out


@torch.no_grad()
def _run_block(block, acts: _Activations, batch_size, device, arg_sets, kind, write=True):
    for bi, s in enumerate(range(0, acts.inps.shape[0], batch_size)):
        args, kwargs = arg_sets[acts.batch_args[kind][bi]]
        x = acts.inps[s : s + batch_size].to(device)
        out = _block_output(block(x, *args, **kwargs))
        if write:
            acts.outs[s : s + out.shape[0]] = out.to(acts.outs.device)


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

    def __init__(self, linears: dict[str, nn.Module], device):
        self.device = device
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
                    self.acc[name] = HessianAccumulator(x.shape[-1], device=self.device)
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


# ---------------------------------------------------------------------------- gradients


def compute_gradient_norms(
    model,
    calib: torch.Tensor,
    names: list[str],
    device=None,
    norm: str = "l2",
    scale: float = 100.0,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """GBLM's `G` per named linear (`[out, in]`, float32, on CPU): one backward pass per
    calibration sample through the whole model (on `device`), the language-modelling loss on
    the sample itself; each weight's gradient is folded into its l1/l2 accumulator by a hook
    and freed at once, so at most one gradient per weight exists at any time."""
    home = model_device(model)
    dev = torch.device(device) if device is not None else home
    modules = {n: model.get_submodule(n) for n in names}
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    accs, handles = {}, []
    if dev != home:
        model.to(dev)
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for n, m in modules.items():
            w = m.weight
            w.requires_grad_(True)
            acc = GradientNormAccumulator(tuple(get_weight(m).shape), dev, norm, scale)
            accs[n] = acc
            conv = get_weight(m) is not w

            def fold(p, acc=acc, conv=conv):
                acc.add(p.grad.t() if conv else p.grad)
                p.grad = None

            handles.append(w.register_post_accumulate_grad_hook(fold))
        for i in tqdm(range(calib.shape[0]), desc="gblm gradients", disable=not progress):
            x = calib[i : i + 1].to(dev)
            with torch.enable_grad():
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, rg in saved.items():
            p.requires_grad_(rg)
            p.grad = None
        if dev != home:
            model.to(home)
        model.train(was_training)
    return {n: a.G.cpu() for n, a in accs.items()}


# ------------------------------------------------------------------------------ pruning


def _prune_layer(method, W, H, G, sparsity, n, m, opts, hinv):
    if method == "magnitude":
        return magnitude_layer(W, sparsity, n, m, H=H)
    if method == "wanda":
        return wanda_layer(W, H, sparsity, n, m)
    if method == "gblm":
        return gblm_layer(W, H, G.to(W.device), sparsity, n, m, alpha=opts["alpha"])
    if method == "sparsegpt":
        return sparsegpt_layer(
            W,
            H,
            sparsity,
            n,
            m,
            blocksize=opts["blocksize"],
            percdamp=opts["percdamp"],
            backend=opts["backend"],
            hinv=hinv,
        )
    if method == "rose":
        return rose_layer(
            W,
            H,
            sparsity,
            n,
            m,
            blocksize=opts["blocksize"],
            percdamp=opts["percdamp"],
            range_threshold=opts["range_threshold"],
            backend=opts["backend"],
        )
    max_swaps = opts["max_swaps"]
    if max_swaps == "auto":
        max_swaps = auto_max_swaps(W.shape[0], W.shape[1], m, W.device)
    return sparseswaps_layer(
        W,
        H,
        None,
        max_swaps=max_swaps,
        backend=opts["backend"],
        sparsity=sparsity,
        prune_n=n,
        prune_m=m,
        reconstruct=opts["reconstruct"],
        percdamp=opts["percdamp"],
    )


_INFO_SKIP = {"shape", "device", "method"}


def prune_model(
    model: nn.Module,
    calibration=None,
    method: str = "rose",
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    device=None,
    *,
    tokenizer=None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    batch_size: int = 1,
    targets=None,
    ignore=None,
    blocks: str | None = None,
    offload_activations: bool | None = None,
    progress: bool = True,
    **method_options,
) -> PruneReport:
    """Prune every linear layer of the decoder blocks of `model` in place; return a report.

    calibration: LongTensor `[nsamples, seqlen]` of token ids (used as given), or text to
        tokenize with `tokenizer` and sample `nsamples` windows of `seqlen` from (seeded by
        `seed`): a list of strings, a text file path, 'builtin', 'wikitext2' or 'c4'.
        Not needed for `magnitude`.
    method: magnitude | wanda | sparsegpt | rose | gblm | sparseswaps. `method_options`:
        sparsegpt: blocksize, percdamp, backend; rose: + range_threshold;
        gblm: alpha, norm ('l1'/'l2'), scale, gradients (precomputed {name: G});
        sparseswaps: max_swaps ('auto': on CPU a budget of 3e8 pair evaluations per layer,
        1 to 100 steps; on GPU until no row improves),
        reconstruct (OBS reconstruction on the refined mask), percdamp, backend.
    sparsity / prune_n:prune_m: unstructured fraction, or N pruned in every M inputs.
    device: where each block runs (the model stays where it is; default: the model's
        device). batch_size: calibration samples per block forward.
    targets / ignore: glob patterns on linear names inside a block (`self_attn.*`, `q_proj`).
    blocks: module path of the decoder block list when auto-detection is not wanted.
    offload_activations: keep the calibration activations on CPU (True), on `device`
        (False), or decide by free memory (None).
    """
    t_start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    opts = _check_method(method, method_options)
    sparsity = check_sparsity(sparsity)
    n, m = check_pattern(prune_n, prune_m, prune_m or 1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    home = model_device(model)
    dev = _check_device(device, home)
    blocks_path, block_list = find_blocks(model, blocks)
    kinds = block_kinds(model, len(block_list))
    check_selection(block_list, targets, ignore)
    per_block = [find_linears(b, targets, ignore) for b in block_list]
    for i, lins in enumerate(per_block):
        for name, mod in lins.items():
            try:
                check_pattern(n, m, get_weight(mod).shape[1])
            except ValueError as e:
                raise ValueError(
                    f"prune_n:prune_m={n}:{m} does not fit {blocks_path}.{i}.{name}: {e}"
                ) from e

    calib = None
    if method != "magnitude":
        if calibration is None:
            raise ValueError(f"method {method!r} needs calibration data (calibration=...)")
        from .data import get_calibration

        calib = get_calibration(calibration, tokenizer, nsamples, seqlen, seed)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab and calib.max().item() >= vocab:
            raise ValueError(f"calibration token ids exceed the model's vocab_size {vocab}")

    report = PruneReport(
        method=method,
        sparsity=n / m if n else sparsity,
        pattern=pattern_name(n, m),
        nsamples=0 if calib is None else calib.shape[0],
        seqlen=0 if calib is None else calib.shape[1],
        device=str(dev),
        options=_jsonable({k: v for k, v in opts.items() if k != "gradients"}),
    )
    totals = {"solve_seconds": 0.0, "forward_seconds": 0.0, "blocks": len(block_list)}

    G = None
    if method == "gblm":
        names = [f"{blocks_path}.{i}.{k}" for i, lins in enumerate(per_block) for k in lins]
        G = opts["gradients"]
        if G is None:
            t0 = time.perf_counter()
            G = compute_gradient_norms(
                model, calib, names, dev, opts["norm"], opts["scale"], progress
            )
            totals["gradient_seconds"] = time.perf_counter() - t0
        missing = [k for k in names if k not in G]
        if missing:
            raise ValueError(
                f"gradients has no entry for {missing[0]} (and {len(missing) - 1} more)"
            )

    was_training = model.training
    model.eval()
    acts = None
    if calib is not None:
        t0 = time.perf_counter()
        acts = _capture(model, block_list, kinds, calib, batch_size, dev, offload_activations)
        totals["forward_seconds"] += time.perf_counter() - t0
        totals["activation_bytes"] = acts.nbytes
        totals["activation_device"] = str(acts.inps.device)
        arg_sets = [(_to(a, dev), _to(k, dev)) for a, k in acts.arg_sets]

    bar = tqdm(list(enumerate(block_list)), desc=f"{method} {report.pattern}", disable=not progress)
    try:
        for i, block in bar:
            block_home = next(block.parameters()).device
            block.to(dev)
            lins = per_block[i]
            hooks = None
            if acts is not None:
                t0 = time.perf_counter()
                hooks = _HessianHooks(lins, dev)
                try:
                    for bi, s in enumerate(range(0, acts.inps.shape[0], batch_size)):
                        hooks.batch = min(batch_size, acts.inps.shape[0] - s)
                        args, kwargs = arg_sets[acts.batch_args[kinds[i]][bi]]
                        x = acts.inps[s : s + batch_size].to(dev)
                        block(x, *args, **kwargs)
                        hooks.end_batch()
                finally:
                    hooks.remove()
                totals["forward_seconds"] += time.perf_counter() - t0
            inverses = {}
            for name, mod in lins.items():
                full = f"{blocks_path}.{i}.{name}"
                W = get_weight(mod).detach()
                H = None
                lead = None
                if hooks is not None:
                    lead = hooks.leader.get(name)
                    if lead is None:
                        raise RuntimeError(f"{full} was never called in the block's forward")
                    H = hooks.acc[lead].H
                hinv = None
                if method == "sparsegpt":
                    if lead not in inverses:
                        inverses[lead] = inverse_hessian(H, opts["percdamp"])
                    hinv = inverses[lead]
                r = _prune_layer(
                    method, W, H, None if G is None else G[full], sparsity, n, m, opts, hinv
                )
                set_weight(mod, r.weight)
                totals["solve_seconds"] += r.info.get("seconds", 0.0)
                report.layers.append(
                    LayerReport(
                        name=f"{i}.{name}",
                        block=i,
                        shape=tuple(W.shape),
                        method=method,
                        sparsity=1.0 - int(r.mask.sum().item()) / r.mask.numel(),
                        loss=r.loss,
                        seconds=float(r.info.get("seconds", 0.0)),
                        hessian=None if lead is None else f"{i}.{lead}",
                        info=_jsonable({k: v for k, v in r.info.items() if k not in _INFO_SKIP}),
                    )
                )
            del hooks, inverses
            if acts is not None and i + 1 < len(block_list):
                t0 = time.perf_counter()
                _run_block(block, acts, batch_size, dev, arg_sets, kinds[i])
                acts.swap()
                totals["forward_seconds"] += time.perf_counter() - t0
            block.to(block_home)
            bar.set_postfix(block=i)
    finally:
        bar.close()
        model.train(was_training)

    params = sum(lr.shape[0] * lr.shape[1] for lr in report.layers)
    pruned = sum(lr.sparsity * lr.shape[0] * lr.shape[1] for lr in report.layers)
    report.achieved_sparsity = pruned / max(1, params)
    losses = [lr.loss for lr in report.layers if lr.loss is not None]
    totals.update(params=params, layers=len(report.layers), blocks_path=blocks_path)
    if losses:
        totals["loss"] = float(sum(losses))
    report.totals = totals
    report.seconds = time.perf_counter() - t_start
    return report


# -------------------------------------------------------------------------- verification


@torch.no_grad()
def check_model_sparsity(model, report: PruneReport, blocks: str | None = None) -> dict:
    """Measured zeros of every layer in `report` (and the N:M pattern where one was asked);
    raises `AssertionError`-free `ValueError` naming the first layer that is off."""
    path, block_list = find_blocks(model, blocks or report.totals.get("blocks_path"))
    pat = report.pattern
    n, m = (int(v) for v in pat.split(":")) if ":" in pat else (0, 0)
    zeros = total = 0
    for lr in report.layers:
        mod = block_list[lr.block].get_submodule(lr.name.split(".", 1)[1])
        W = get_weight(mod)
        z = int((W == 0).sum().item())
        expected = round(lr.sparsity * W.numel())
        if z < expected:
            raise ValueError(f"{path}.{lr.name}: {z} zeros, expected at least {expected}")
        if n and not check_nm_keep_mask(W != 0, n, m) and not _nm_at_least(W, n, m):
            raise ValueError(f"{path}.{lr.name} does not follow the {n}:{m} pattern")
        zeros += z
        total += W.numel()
    return {"zeros": zeros, "params": total, "sparsity": zeros / max(1, total)}


def _nm_at_least(W: torch.Tensor, n: int, m: int) -> bool:
    """Every group of m inputs has at least n zeros (a kept weight may be exactly 0)."""
    rows, cols = W.shape
    return bool(((W == 0).reshape(rows, cols // m, m).sum(-1) >= n).all())
