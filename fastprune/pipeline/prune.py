"""`prune_model`: sequential, block by block, the way SparseGPT and Wanda do it (see the
package docstring of `fastprune.pipeline`), as a short sequence of named stages: check the
arguments (`check_prune_args`), then a `PruneRun`'s gradient pass (GBLM), layer-wise
allocation (OWL), capture of the first block's inputs and, per block, its calibration
(Hessians), its layer solves and the propagation of its pruned outputs. What each method needs
and how its solver is called comes from `fastprune.METHODS`."""

from __future__ import annotations

import contextlib
import functools
import logging
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..asymmetric import asymmetric_target
from ..block_layers import BlockLayers, check_selection, count_block_zeros, find_block_layers
from ..experts import ExpertProjection, check_moe_calibration
from ..hessian import HESSIAN_KINDS, HESSIAN_PRECISIONS, inverse_hessian
from ..layers import get_weight, set_weight
from ..masks import pattern_name, pruned_fraction
from ..methods import Method, composed, get_method, methods_where
from ..models import find_blocks, model_device
from ..solvers.sparsegpt_batched import inverse_hessians
from ..validation import check_int, check_pattern, check_sparsity
from .allocation import (
    OWL_LAMBDA,
    OWL_THRESHOLD,
    check_allocation,
    outlier_ratios,
    owl_block_sparsities,
)
from .capture import block_kinds, capture_inputs, run_block, run_block_paired, to_device
from .distributed import Comm, active_world, fingerprint
from .gradients import compute_gradient_norms
from .hessian_hooks import HessianHooks, PairedHessianHooks
from .report import LayerReport, PruneReport, jsonable

logger = logging.getLogger("fastprune")
_INFO_SKIP = {"shape", "device", "method"}
_UNREPORTED = {"gradients"}  # precomputed {name: G}: not an option worth a report line
# at most this many bytes of stacked expert Hessians per batched inverse / solve
EXPERT_BATCH_BYTES = 1 << 30
# the arguments every rank must have been given alike (with the pattern, options, blocks,
# allocation and device type)
_AGREED = (
    "method", "sparsity", "seed", "targets", "ignore", "hessian_precision", "hessian_kind",
    "moe_calibration", "batch_size",
)  # fmt: skip


def _check_hessian_kind(kind: object, meth) -> str:
    """ "full" or "diagonal" for `meth` ("auto": the diagonal where the method reads no more)."""
    if kind not in HESSIAN_KINDS:
        raise ValueError(f"hessian_kind must be one of {HESSIAN_KINDS}, got {kind!r}")
    if kind == "auto":
        return "diagonal" if meth.reads_diagonal else "full"
    if kind == "diagonal" and not meth.reads_diagonal:
        raise ValueError(
            f"hessian_kind='diagonal' does not fit {meth.name!r}, which needs the full H "
            f"(only {', '.join(methods_where('reads_diagonal'))} read diag(H) alone)"
        )
    return kind


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
    hessian_precision: str = "auto",
    hessian_kind: str = "auto",
    targets=None,
    ignore=None,
    blocks: str | None = None,
    offload_activations: bool | None = None,
    allocation: str = "uniform",
    owl_threshold: float = OWL_THRESHOLD,
    owl_lambda: float = OWL_LAMBDA,
    moe_calibration: str = "routed",
    asymmetric: bool = False,
    progress: bool = True,
    **method_options,
) -> PruneReport:
    """Prune every linear layer (and every expert of MoE blocks) of the decoder blocks of
    `model` in place; return a report.

    calibration: LongTensor `[nsamples, seqlen]` of token ids (used as given), or text to
        tokenize with `tokenizer` and sample `nsamples` windows of `seqlen` from (seeded by
        `seed`): a list of strings, a text file path, 'builtin', 'wikitext2' or 'c4'.
        Not needed for `magnitude`.
    method: a name in `fastprune.METHODS` (magnitude | wanda | sparsegpt | rose | gblm |
        sparseswaps); `method_options` are that entry's options:
        sparsegpt: blocksize, percdamp, backend; rose: + range_threshold;
        gblm: alpha, norm ('l1'/'l2'), scale, gradients (precomputed {name: G});
        sparseswaps: max_swaps ('auto': on CPU a budget of 3e8 pair evaluations per layer,
        1 to 100 steps; on GPU a budget of 5e12, ~2 s a layer on an H100),
        reconstruct (OBS reconstruction on the refined mask), percdamp, backend;
        fastprune (the recipe): select, refine, refine_on, reconstruct, max_swaps ('auto':
        sparseswaps' budget, capped at 4 steps at 2:4 and 16 otherwise), blocksize, percdamp,
        range_threshold, backend (see `fastprune.solvers.recipes`).
        Any mask selector (magnitude, wanda, gblm, sparsegpt, rose) also takes
        refine='sparseswaps', refine_on ('original' | 'reconstructed'), reconstruct
        (True | 'best') and max_swaps: `fastprune.compose_layer` then solves each layer.
    sparsity / prune_n:prune_m: unstructured fraction, or N pruned in every M inputs.
    device: where each block runs (the model stays where it is; default: the model's
        device). batch_size: calibration samples per block forward (and per Hessian GEMM).
    hessian_precision: "auto" (tensor cores with float32 accumulation for a float16/bfloat16
        model on a GPU, else the reference's float32 arithmetic), "exact" (always the
        reference's) or "fast"; see `fastprune.hessian`.
    hessian_kind: what is accumulated per layer input: "full" (`H`, cols^2 floats) or
        "diagonal" (`diag(H)` alone, in Wanda's own arithmetic: cols floats and no GEMM; for
        the methods that read nothing else, Wanda and GBLM, whose layers then report no
        loss); "auto" (default) takes "diagonal" for those methods and "full" otherwise.
    targets / ignore: glob patterns on layer names inside a block (`self_attn.*`, `q_proj`,
        `mlp.experts.down_proj`). Every matrix of a block is pruned, left dense by a rule
        (MoE routers, expert bias tables) or by targets/ignore; any other is an error naming
        it (see `fastprune.block_layers`). The report lists what stayed dense and why.
    moe_calibration: "routed" (each expert's Hessian from the tokens the router sends it,
        normalised by their count) or "all" (every token through every expert, for the
        Hessians only). An expert that receives no token is pruned with `H = I`, i.e. by
        weight magnitude under the method's own selection, with a warning.
    blocks: module path of the decoder block list when auto-detection is not wanted.
    offload_activations: keep the calibration activations on CPU (True), on `device`
        (False), or decide by free memory (None).
    allocation: layer-wise sparsity, "uniform" or "owl" (outlier-weighted per decoder block,
        same total; `owl_threshold` is OWL's M, `owl_lambda` the spread; N:M stays
        uniform).
    asymmetric: fit every layer to the dense model's outputs rather than to its own on the
        pruned model's inputs (GPTAQ's asymmetric calibration; see `fastprune.asymmetric`):
        each block also runs on the dense model's activations, each layer's weights are
        corrected by `W (C - H) H^-1` before the method prunes them. Dense models in one
        process; it needs the full `H` (any method with calibration) and doubles the
        activations and the calibration forwards.

    Inside an initialised torch.distributed process group of size > 1, every rank calls this
    with its own replica of the model and the same arguments (checked before any work: a
    `ValueError` names what differs): each rank calibrates on its shard of the samples (GBLM:
    computes its gradient norms on it), Hessians and gradient norms are summed onto owner
    ranks, layers are solved on their owners (or, for methods whose rows are independent,
    in row ranges on several ranks when that balances the block better; see
    `FASTPRUNE_ROW_SPLIT` in `fastprune.pipeline.distributed`) and broadcast, and every
    rank ends with the same pruned model and report. An error on one rank stops all of them
    (`RankFailedError` on the others); see `fastprune.pipeline.distributed`.
    """
    return run_stages(dict(locals()), ResidentBlocks())


def run_stages(arguments: dict, store: BlockStore) -> PruneReport:
    """`prune_model`'s stages on its `arguments` (by name), the decoder blocks kept between
    stages by `store` (in the model, or streamed from a checkpoint)."""
    t_start = time.perf_counter()
    comm = Comm() if active_world() > 1 else None
    with _guarded(comm, "setup (arguments, model, calibration)"):
        args = check_prune_args(**arguments)
        if comm is not None and args.asymmetric:
            raise ValueError("asymmetric=True runs in one process, not under torch.distributed")
        store.check(args)
    run = PruneRun(args, comm, t_start, store)
    run.agree()
    run.gradients()
    model = args.model
    was_training = model.training
    model.eval()
    try:
        run.allocate()
        run.capture()
        store.captured(args)
        for i in run.progress():
            hooks = run.calibrate_block(i)
            run.solve_block(i, hooks)
            del hooks  # the block's Hessians, freed before the propagation
            run.propagate_block(i)
    finally:
        run.close()
        model.train(was_training)
    return run.finish()


def peak_host_memory() -> int:
    """This process's peak resident memory so far, in bytes (`getrusage`)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class BlockStore:
    """Where the decoder blocks live between `prune_model`'s stages: `enter` makes block `i`
    (named `prefix`) ready on `device` for its calibration and solves, `leave` puts it away
    once pruned and propagated."""

    streamed = False

    def check(self, args: PruneArgs) -> None:
        """Refuse (`ValueError`) what this store cannot run, before any work."""

    def captured(self, args: PruneArgs) -> None:
        """The first block's inputs are captured: what lies outside the blocks has done its
        part."""

    def enter(self, i: int, block: nn.Module, prefix: str, device: torch.device) -> None:
        raise NotImplementedError

    def leave(self, i: int, block: nn.Module, prefix: str) -> None:
        raise NotImplementedError

    def block_zeros(self, blocks: nn.ModuleList) -> tuple[int, int]:
        """(zeros, entries) over every matrix of the pruned blocks."""
        return count_block_zeros(blocks)

    def identity(self) -> str | None:
        """What ranks must agree on besides the model's own checksum (None: nothing)."""
        return None


class ResidentBlocks(BlockStore):
    """The blocks of an in-memory model: each moved to the device for its stages and back
    where it was after them."""

    def __init__(self) -> None:
        self.home: dict[int, torch.device] = {}

    def enter(self, i: int, block: nn.Module, prefix: str, device: torch.device) -> None:
        self.home[i] = next(block.parameters()).device
        block.to(device)

    def leave(self, i: int, block: nn.Module, prefix: str) -> None:
        block.to(self.home.pop(i))


def _guarded(comm: Comm | None, what: str):
    """Distributed: a phase whose error every rank hears of (`Comm.guard`)."""
    return contextlib.nullcontext() if comm is None else comm.guard(what)


@dataclass
class PruneArgs:
    """`prune_model`'s arguments, checked and resolved: the method (composed with a
    refinement where asked) and its options, the pattern, the device, the decoder blocks and
    every block's layers, the calibration tokens."""

    model: nn.Module
    method: str
    meth: Method
    opts: dict
    sparsity: float
    n: int
    m: int
    dev: torch.device
    blocks_path: str
    block_list: nn.ModuleList
    kinds: list
    layouts: list[BlockLayers]
    calib: torch.Tensor | None
    seed: int
    batch_size: int
    hessian_precision: str
    hessian_kind: str
    moe_calibration: str
    asymmetric: bool
    targets: Any
    ignore: Any
    offload_activations: bool | None
    allocation: str
    owl_threshold: float
    owl_lambda: float
    progress: bool

    @property
    def per_block(self) -> list[dict]:
        return [bl.layers for bl in self.layouts]


def check_prune_args(
    model, calibration, method, sparsity, prune_n, prune_m, device, *, tokenizer, nsamples,
    seqlen, seed, batch_size, hessian_precision, hessian_kind, targets, ignore, blocks,
    offload_activations,
    allocation, owl_threshold, owl_lambda, moe_calibration, asymmetric, progress, method_options,
) -> PruneArgs:  # fmt: skip
    """Every argument checked before any work (errors name the argument); the calibration
    tokens drawn."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meth = composed(get_method(method), method_options)
    opts = meth.check_options(method_options)
    sparsity = check_sparsity(sparsity)
    n, m = check_pattern(prune_n, prune_m, prune_m or 1)
    allocation, owl_threshold, owl_lambda = check_allocation(allocation, owl_threshold, owl_lambda)
    if allocation == "owl" and n:
        logger.info("allocation='owl' keeps N:M patterns uniform (every layer %d:%d)", n, m)
        allocation = "uniform"
    if allocation == "owl" and not meth.needs_calibration:
        raise ValueError(f"allocation='owl' needs calibration data, which {method!r} does not use")
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    if hessian_precision not in HESSIAN_PRECISIONS:
        raise ValueError(
            f"hessian_precision must be one of {HESSIAN_PRECISIONS}, got {hessian_precision!r}"
        )
    if not isinstance(asymmetric, bool):
        raise TypeError(f"asymmetric must be True or False, got {asymmetric!r}")
    if asymmetric and not meth.needs_calibration:
        raise ValueError(f"asymmetric=True needs calibration data, which {method!r} does not use")
    if asymmetric and hessian_kind == "diagonal":
        raise ValueError("asymmetric=True needs the full H; hessian_kind='diagonal' keeps none")
    hessian_kind = "full" if asymmetric else _check_hessian_kind(hessian_kind, meth)
    dev = _check_device(device, model_device(model))
    blocks_path, block_list = find_blocks(model, blocks)
    moe_calibration = check_moe_calibration(moe_calibration)
    kinds = block_kinds(model, len(block_list))
    check_selection(block_list, targets, ignore)
    layouts = [
        find_block_layers(b, targets, ignore, f"{blocks_path}.{i}")
        for i, b in enumerate(block_list)
    ]
    if not any(bl.layers for bl in layouts):
        raise ValueError("targets/ignore leave no layer to prune")
    if asymmetric:
        expert = next((k for bl in layouts for k in bl.layers if bl.is_expert(k)), None)
        if expert is not None:
            raise ValueError(
                f"asymmetric=True pairs each token's dense and pruned inputs, which routed "
                f"experts do not have (the router may send them elsewhere): {expert}"
            )
    for i, bl in enumerate(layouts):
        for name, mod in bl.layers.items():
            try:
                check_pattern(n, m, get_weight(mod).shape[1])
            except ValueError as e:
                raise ValueError(
                    f"prune_n:prune_m={n}:{m} does not fit {blocks_path}.{i}.{name}: {e}"
                ) from e
    calib = None
    if meth.needs_calibration:
        if calibration is None:
            raise ValueError(f"method {method!r} needs calibration data (calibration=...)")
        from ..data import get_calibration

        calib = get_calibration(calibration, tokenizer, nsamples, seqlen, seed)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab and calib.max().item() >= vocab:
            raise ValueError(f"calibration token ids exceed the model's vocab_size {vocab}")
    return PruneArgs(
        model, method, meth, opts, sparsity, n, m, dev, blocks_path, block_list, kinds,
        layouts, calib, seed, batch_size, hessian_precision, hessian_kind, moe_calibration,
        asymmetric, targets, ignore,
        offload_activations, allocation, owl_threshold, owl_lambda, progress,
    )  # fmt: skip


class PruneRun:
    """One `prune_model` call's state between its stages: the report and its totals, the
    gradient norms (GBLM), the per-block sparsities, the calibration activations."""

    def __init__(
        self, args: PruneArgs, comm: Comm | None, t_start: float, store: BlockStore
    ) -> None:
        a = self.args = args
        self.comm = comm
        self.store = store
        self.t_start = t_start
        calib = a.calib
        # this rank's share of the samples (all of them in one process)
        self.local = calib if comm is None or calib is None else comm.shard(calib)
        self.report = PruneReport(
            method=a.meth.name,
            sparsity=a.n / a.m if a.n else a.sparsity,
            pattern=pattern_name(a.n, a.m),
            nsamples=0 if calib is None else calib.shape[0],
            seqlen=0 if calib is None else calib.shape[1],
            device=str(a.dev),
            options=jsonable(
                {k: v for k, v in a.opts.items() if k not in _UNREPORTED}
                | (
                    {"hessian_precision": a.hessian_precision, "hessian_kind": a.hessian_kind}
                    if a.meth.needs_hessian
                    else {}
                )
                | ({"allocation": a.allocation} if a.meth.needs_calibration else {})
                | ({"asymmetric": True} if a.asymmetric else {})
            ),
        )
        # where the time goes (forward_seconds = capture + hessian forwards + propagation)
        self.totals = {"solve_seconds": 0.0, "forward_seconds": 0.0, "blocks": len(a.block_list)}
        self.totals.update(
            capture_seconds=0.0, hessian_seconds=0.0, propagate_seconds=0.0, inverse_seconds=0.0
        )
        if a.asymmetric:
            self.totals["asymmetric_seconds"] = 0.0
        self.show = a.progress and (comm is None or comm.rank == 0)
        self.G = None
        self.partial_G = False  # distributed GBLM: G holds this rank's raw sums until reduced
        self.block_sparsity = [a.sparsity] * len(a.block_list)
        self.acts = self.arg_sets = None
        self.dense_acts = None  # asymmetric: the dense model's activations
        self.untouched: list[str] = []  # expert Hessians without a token (pruned with H = I)
        self.bar = None

    def guard(self, what: str):
        return _guarded(self.comm, what)

    def clock(self, key: str, t0: float) -> float:
        """Add the time since `t0` to `totals[key]` (after the device's queued work ends)."""
        if self.args.dev.type == "cuda":
            torch.cuda.synchronize(self.args.dev)
        t = time.perf_counter()
        self.totals[key] += t - t0
        if key in ("capture_seconds", "hessian_seconds", "propagate_seconds"):
            self.totals["forward_seconds"] += t - t0
        return t

    # ---------------------------------------------------------------------------- stages

    def agree(self) -> None:
        """Distributed: before any work, every rank was given the same model, data and
        arguments (a `ValueError` names what differs)."""
        if self.comm is None:
            return
        a = self.args
        fields = {k: getattr(a, k) for k in _AGREED}
        self.comm.check_consistent(
            fingerprint(
                a.model,
                a.calib,
                **fields,
                pattern=pattern_name(a.n, a.m),
                options=a.opts,
                blocks=a.blocks_path,
                allocation=(a.allocation, a.owl_threshold, a.owl_lambda),
                checkpoint=self.store.identity(),
                **{"device type": a.dev.type, "row split": self.comm.row_split},
            )
        )

    def gradients(self) -> None:
        """GBLM: the per-weight gradient norms over the calibration samples (or the
        precomputed `gradients` option), for every pruned layer."""
        a = self.args
        if not a.meth.needs_gradients:
            return
        names = [f"{a.blocks_path}.{i}.{k}" for i, lins in enumerate(a.per_block) for k in lins]
        G = a.opts["gradients"]
        if G is None:
            with self.guard("the GBLM gradient passes"):
                t0 = time.perf_counter()
                G = compute_gradient_norms(
                    a.model, self.local, names, a.dev, a.opts["norm"], a.opts["scale"],
                    self.show, finalize=self.comm is None,
                )  # fmt: skip
                self.totals["gradient_seconds"] = time.perf_counter() - t0
            self.partial_G = self.comm is not None
        missing = [k for k in names if k not in G]
        if missing:
            raise ValueError(
                f"gradients has no entry for {missing[0]} (and {len(missing) - 1} more)"
            )
        self.G = G

    def allocate(self) -> None:
        """OWL: per-block sparsities from the blocks' outlier ratios (same total)."""
        a = self.args
        if a.allocation != "owl":
            return
        t0 = time.perf_counter()
        with self.guard("the OWL allocation pass"):
            ratios = outlier_ratios(
                a.model, a.block_list, a.layouts, a.kinds, self.local, a.batch_size, a.dev,
                a.offload_activations, a.owl_threshold, self.comm, a.moe_calibration,
            )  # fmt: skip
        params = [sum(get_weight(x).numel() for x in lins.values()) for lins in a.per_block]
        self.block_sparsity = owl_block_sparsities(ratios, params, a.sparsity, a.owl_lambda)
        self.totals["allocation_seconds"] = self.clock("forward_seconds", t0) - t0
        self.totals["allocation"] = {
            "rule": "owl", "threshold": a.owl_threshold, "lambda": a.owl_lambda,
            "outlier_ratios": ratios, "block_sparsity": self.block_sparsity,
        }  # fmt: skip

    def capture(self) -> None:
        """The first block's inputs over this rank's calibration samples, and the arguments
        the model passes its blocks."""
        a = self.args
        if a.calib is None:
            return
        with self.guard("the capture of the first block's inputs"):
            t0 = time.perf_counter()
            self.acts = capture_inputs(
                a.model, a.block_list, a.kinds, self.local, a.batch_size, a.dev,
                a.offload_activations,
            )  # fmt: skip
            self.clock("capture_seconds", t0)
            self.arg_sets = [
                (to_device(x, a.dev), to_device(k, a.dev)) for x, k in self.acts.arg_sets
            ]
        if a.asymmetric:
            self.dense_acts = self.acts.twin()
        self.totals["activation_bytes"] = self.acts.nbytes * (2 if a.asymmetric else 1)
        self.totals["activation_device"] = str(self.acts.inps.device)

    def progress(self):
        """The block indices, under a progress bar."""
        a = self.args
        desc = f"{a.method} {self.report.pattern}"
        self.bar = tqdm(range(len(a.block_list)), desc=desc, disable=not self.show)
        return self.bar

    def calibrate_block(self, i: int) -> HessianHooks | None:
        """Block `i` on the device and, with calibration, one forward with hooks that
        accumulate its layers' Hessians; the hooks (None without calibration)."""
        a = self.args
        block = a.block_list[i]
        t0 = time.perf_counter()
        with self.guard(f"block {i}: its forward with the Hessian hooks"):
            self.store.enter(i, block, f"{a.blocks_path}.{i}", a.dev)
            if self.acts is None:
                return None
            kind = PairedHessianHooks if a.asymmetric else HessianHooks
            hooks = kind(
                block, a.layouts[i], a.dev, a.hessian_precision, a.moe_calibration, a.hessian_kind
            )
            try:
                if a.asymmetric:  # the block is still dense: its dense outputs come from here
                    run_block_paired(
                        block, self.dense_acts, self.acts, a.batch_size, a.dev, self.arg_sets,
                        a.kinds[i], hooks,
                    )  # fmt: skip
                else:
                    run_block(
                        block, self.acts, a.batch_size, a.dev, self.arg_sets, a.kinds[i],
                        hooks=hooks,
                    )  # fmt: skip
            finally:
                hooks.remove()
            self.clock("hessian_seconds", t0)
        return hooks

    def solve_block(self, i: int, hooks: HessianHooks | None) -> None:
        """Every layer of block `i` pruned in place (experts of one projection as batches
        where the method does so; under several ranks, each layer on its owner after the
        Hessians are reduced), its reports added."""
        a = self.args
        lins = a.per_block[i]
        inverses: dict = {}
        solve = functools.partial(self._solve_layer, i, hooks, inverses)
        block_name = f"{a.blocks_path}.{i}"
        if self.comm is None:
            batched = {}
            if hooks is not None:
                self.untouched.extend(f"{i}.{k}" for k in _identity_for_unrouted(hooks, block_name))
                for group in _expert_groups(lins):
                    batched.update(self._solve_experts(i, hooks, inverses, group))
            done = []
            last_use = {} if hooks is None else {hooks.leader.get(k): k for k in lins}
            for name, mod in lins.items():
                done.append(batched.get(name) or solve(name, mod))
                lead = None if hooks is None else hooks.leader.get(name)
                if lead is not None and last_use.get(lead) == name:
                    # this input's last layer is solved: its H and inverse go now, so a
                    # block never holds more than the rest of its own
                    hooks.release(lead)
                    inverses.pop(lead, None)
        else:
            comm = self.comm
            lead_of = {} if hooks is None else hooks.leader
            separable = a.meth.separable(a.n, a.opts)
            parts_of = comm.plan(lins, lead_of, a.meth.shares_inverse, separable)
            if hooks is not None:
                comm.reduce_hessians(hooks, parts_of)
                self.untouched.extend(f"{i}.{k}" for k in _identity_for_unrouted(hooks, block_name))
            if self.partial_G:
                full = {f"{block_name}.{k}": ps for k, ps in parts_of.items()}
                comm.reduce_gradients(self.G, full, a.opts["norm"])
            done = comm.solve_block(lins, parts_of, solve, f"block {i}: its layer solves")
        for lr in done:
            self.totals["solve_seconds"] += lr.seconds
        self.report.layers.extend(done)

    def propagate_block(self, i: int) -> None:
        """The pruned block `i` run again so the next block sees its outputs; the block goes
        back where it was."""
        a = self.args
        block = a.block_list[i]
        t0 = time.perf_counter()
        with self.guard(f"block {i}: the propagation through the pruned block"):
            if self.acts is not None and i + 1 < len(a.block_list):
                run_block(block, self.acts, a.batch_size, a.dev, self.arg_sets, a.kinds[i])
                self.acts.swap()
                if self.dense_acts is not None:
                    self.dense_acts.swap()
                self.clock("propagate_seconds", t0)
            self.store.leave(i, block, f"{a.blocks_path}.{i}")
        if self.bar is not None:
            self.bar.set_postfix(block=i)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finish(self) -> PruneReport:
        """The report's totals: achieved and block sparsity, losses, what stayed dense."""
        a, report, totals = self.args, self.report, self.totals
        params = sum(lr.shape[0] * lr.shape[1] for lr in report.layers)
        pruned = sum(lr.sparsity * lr.shape[0] * lr.shape[1] for lr in report.layers)
        report.achieved_sparsity = pruned / max(1, params)
        zeros, matrices = self.store.block_zeros(a.block_list)
        report.block_sparsity = zeros / max(1, matrices)
        losses = [lr.loss for lr in report.layers if lr.loss is not None]
        totals.update(params=params, layers=len(report.layers), blocks_path=a.blocks_path)
        totals.update(block_params=matrices, block_zeros=zeros)
        if any(bl.is_expert(k) for bl in a.layouts for k in bl.layers):
            totals["moe_calibration"] = a.moe_calibration
        report.dense = [
            {"name": f"{i}.{d.name}", "shape": list(d.shape), "reason": d.reason}
            for i, bl in enumerate(a.layouts)
            for d in bl.dense
        ]
        if self.untouched:
            totals["experts_without_tokens"] = self.untouched
        totals["path"] = "streamed" if self.store.streamed else "in memory"
        totals["peak_host_memory_bytes"] = peak_host_memory()
        if losses:
            totals["loss"] = float(sum(losses))
        if self.comm is not None:
            own = totals["forward_seconds"] + totals.get("gradient_seconds", 0.0)
            totals.update(self.comm.gather_stats(own))
        report.totals = totals
        report.seconds = time.perf_counter() - self.t_start
        return report

    # ----------------------------------------------------------------------- layer solves

    def _shared_inverse(self, hooks, inverses, lead):
        """The inverse of the H of input group `lead`, one per distinct H (SparseGPT)."""
        if lead not in inverses:
            t0 = time.perf_counter()
            percdamp = self.args.opts.get("percdamp", 0.01)
            inverses[lead] = inverse_hessian(hooks.acc[lead].H, percdamp)
            self.clock("inverse_seconds", t0)
        return inverses[lead]

    def _solve_layer(self, i, hooks, inverses, name, mod, rows=None):
        """Prune one linear of block `i` (or its `rows`, a slice) in place; its
        `LayerReport` (of those rows)."""
        a = self.args
        full = f"{a.blocks_path}.{i}.{name}"
        W = get_weight(mod).detach()
        H = lead = hinv = tokens = None
        if hooks is not None:
            lead = hooks.leader.get(name)
            if lead is None:
                raise RuntimeError(f"{full} was never called in the block's forward")
            H = hooks.acc[lead].H
            if name in hooks.tokens:  # an expert: the tokens its H was built from
                tokens = hooks.acc[lead].nsamples
        # one inverse per distinct H (SparseGPT). ROSE factors H[perm][:, perm] with
        # its own layer's permutation (from |W|), so it has no inverse to share.
        if a.meth.wants_inverse(a.n, a.opts) and H is not None:
            hinv = self._shared_inverse(hooks, inverses, lead)
        g = None if self.G is None else self.G[full]
        target, extra = W, {}
        if a.asymmetric and H is not None:
            inv = self._shared_inverse(hooks, inverses, lead)  # hinv itself where shared
            t0 = time.perf_counter()
            target, extra = asymmetric_target(W, H, hooks.cross[lead].C, hinv=inv)
            self.clock("asymmetric_seconds", t0)
        r = a.meth.solve(target, H, g, self.block_sparsity[i], a.n, a.m, a.opts, hinv, rows)
        if rows is None:
            set_weight(mod, r.weight)
        else:
            with torch.no_grad():
                W[rows].copy_(r.weight)
        lr = _layer_report(i, name, W if rows is None else W[rows], a.method, r, lead)
        lr.info.update(extra)
        if tokens is not None:
            lr.info["tokens"] = int(tokens)
        return lr

    def _solve_experts(self, i, hooks, inverses, group) -> dict[str, LayerReport]:
        """The experts of one projection of block `i` (`group`: (name, ExpertProjection)),
        their inverses computed as batches on a GPU (for a method sharing inverses), then,
        where the method solves such layers as batches (`Method.batches`), solved together
        in chunks; {name: report} of those solved."""
        a = self.args
        meth, opts, dev = a.meth, a.opts, a.dev
        leads = [hooks.leader[name] for name, _ in group]
        cols = hooks.acc[leads[0]].H.shape[0]
        chunk = max(1, EXPERT_BATCH_BYTES // (4 * cols * cols))
        out = {}
        for c0 in range(0, len(group), chunk):
            part, part_leads = group[c0 : c0 + chunk], leads[c0 : c0 + chunk]
            todo = sorted({ld for ld in part_leads if ld not in inverses})
            if meth.wants_inverse(a.n, opts) and todo and dev.type == "cuda":
                # one batched factorisation (on CPU, LAPACK one by one is faster: it stays
                # with the single solves' own inverses)
                t0 = time.perf_counter()
                Hs = [hooks.acc[ld].H for ld in todo]
                inverses.update(zip(todo, inverse_hessians(Hs, opts["percdamp"])))
                self.clock("inverse_seconds", t0)
            if not meth.batches(opts, dev, get_weight(part[0][1]).shape):
                continue
            hinvs = None
            if meth.wants_inverse(a.n, opts):
                hinvs = [self._shared_inverse(hooks, inverses, ld) for ld in part_leads]
            Ws = torch.stack([get_weight(layer).detach() for _, layer in part])
            Hs = [hooks.acc[ld].H for ld in part_leads]  # the accumulators' own, not a copy
            results = meth.solve_batch(Ws, Hs, self.block_sparsity[i], a.n, a.m, opts, hinvs)
            for (name, layer), ld, r in zip(part, part_leads, results):
                set_weight(layer, r.weight)
                lr = _layer_report(i, name, get_weight(layer), a.method, r, ld)
                lr.info["tokens"] = int(hooks.acc[ld].nsamples)
                out[name] = lr
        return out


def _expert_groups(lins: dict) -> list[list[tuple[str, ExpertProjection]]]:
    """The block's experts by projection (one fused parameter each), groups of 2 or more."""
    groups: dict[tuple[int, str], list] = {}
    for name, layer in lins.items():
        if isinstance(layer, ExpertProjection):
            groups.setdefault((id(layer.experts.module), layer.proj), []).append((name, layer))
    return [g for g in groups.values() if len(g) > 1]


def _identity_for_unrouted(hooks, block: str) -> list[str]:
    """Expert Hessians no calibration token reached (`nsamples == 0`, over every rank) become
    the identity, so each method prunes such an expert by weight magnitude under its own
    selection rule and updates nothing; returns their names (warned)."""
    out = []
    for name, acc in hooks.acc.items():
        if name in hooks.tokens and acc.nsamples == 0:
            out.append(name)
            H = acc.H
            if H is not None:
                eye = torch.ones(acc.cols) if H.dim() == 1 else torch.eye(acc.cols)
                acc.H = eye.to(H)
    if out:
        logger.warning(
            "%s: %d expert layer(s) received no calibration token (%s%s): pruned with H = I, "
            "by weight magnitude; more calibration samples or moe_calibration='all' avoid this",
            block, len(out), ", ".join(out[:3]), ", ..." if len(out) > 3 else "",
        )  # fmt: skip
    return out


def _layer_report(i: int, name: str, W: torch.Tensor, method: str, r, lead) -> LayerReport:
    return LayerReport(
        name=f"{i}.{name}",
        block=i,
        shape=tuple(W.shape),
        method=method,
        sparsity=pruned_fraction(r.mask),
        loss=r.loss,
        seconds=float(r.info.get("seconds", 0.0)),
        hessian=None if lead is None else f"{i}.{lead}",
        info=jsonable({k: v for k, v in r.info.items() if k not in _INFO_SKIP}),
    )
