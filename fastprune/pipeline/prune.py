"""`prune_model`: sequential, block by block, the way SparseGPT and Wanda do it (see the
package docstring of `fastprune.pipeline`); what each method needs and how its solver is
called comes from `fastprune.METHODS`."""

from __future__ import annotations

import contextlib
import functools
import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..block_layers import check_selection, count_block_zeros, find_block_layers
from ..experts import ExpertProjection, check_moe_calibration
from ..hessian import HESSIAN_PRECISIONS, inverse_hessian
from ..layers import get_weight, set_weight
from ..masks import pattern_name
from ..methods import composed, get_method
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
from .capture import block_kinds, capture_inputs, run_block, to_device
from .distributed import Comm, active_world, fingerprint
from .gradients import compute_gradient_norms
from .hessian_hooks import HessianHooks
from .report import LayerReport, PruneReport, jsonable

logger = logging.getLogger("fastprune")
_INFO_SKIP = {"shape", "device", "method"}
_UNREPORTED = {"gradients"}  # precomputed {name: G}: not an option worth a report line
# at most this many bytes of stacked expert Hessians per batched inverse / solve
EXPERT_BATCH_BYTES = 1 << 30


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
    targets=None,
    ignore=None,
    blocks: str | None = None,
    offload_activations: bool | None = None,
    allocation: str = "uniform",
    owl_threshold: float = OWL_THRESHOLD,
    owl_lambda: float = OWL_LAMBDA,
    moe_calibration: str = "routed",
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
        fastprune (the recipe): select, refine, refine_on, reconstruct, max_swaps,
        blocksize, percdamp, range_threshold, backend (see `fastprune.solvers.recipes`).
        Any mask selector (magnitude, wanda, gblm, sparsegpt, rose) also takes
        refine='sparseswaps', refine_on ('original' | 'reconstructed'), reconstruct
        (True | 'best') and max_swaps: `fastprune.compose_layer` then solves each layer.
    sparsity / prune_n:prune_m: unstructured fraction, or N pruned in every M inputs.
    device: where each block runs (the model stays where it is; default: the model's
        device). batch_size: calibration samples per block forward (and per Hessian GEMM).
    hessian_precision: "auto" (tensor cores with float32 accumulation for a float16/bfloat16
        model on a GPU, else the reference's float32 arithmetic), "exact" (always the
        reference's) or "fast"; see `fastprune.hessian`.
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
    t_start = time.perf_counter()
    comm = Comm() if active_world() > 1 else None

    def guard(what: str):
        """Distributed: a phase whose error every rank hears of (`Comm.guard`)."""
        return contextlib.nullcontext() if comm is None else comm.guard(what)

    with guard("setup (arguments, model, calibration)"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        meth = composed(get_method(method), method_options)
        opts = meth.check_options(method_options)
        sparsity = check_sparsity(sparsity)
        n, m = check_pattern(prune_n, prune_m, prune_m or 1)
        allocation, owl_threshold, owl_lambda = check_allocation(
            allocation, owl_threshold, owl_lambda
        )
        if allocation == "owl" and n:
            logger.info("allocation='owl' keeps N:M patterns uniform (every layer %d:%d)", n, m)
            allocation = "uniform"
        if allocation == "owl" and not meth.needs_calibration:
            raise ValueError(
                f"allocation='owl' needs calibration data, which {method!r} does not use"
            )
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        if hessian_precision not in HESSIAN_PRECISIONS:
            raise ValueError(
                f"hessian_precision must be one of {HESSIAN_PRECISIONS}, got {hessian_precision!r}"
            )
        home = model_device(model)
        dev = _check_device(device, home)
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
        per_block = [bl.layers for bl in layouts]
        for i, lins in enumerate(per_block):
            for name, mod in lins.items():
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
    if comm is not None:
        # before any work: every rank was given the same model, data and arguments
        comm.check_consistent(
            fingerprint(
                model,
                calib,
                method=method,
                sparsity=sparsity,
                pattern=pattern_name(n, m),
                options=opts,
                seed=seed,
                blocks=blocks_path,
                targets=targets,
                ignore=ignore,
                hessian_precision=hessian_precision,
                moe_calibration=moe_calibration,
                batch_size=batch_size,
                allocation=(allocation, owl_threshold, owl_lambda),
                **{"device type": dev.type, "row split": comm.row_split},
            )
        )
    local = calib if comm is None or calib is None else comm.shard(calib)

    report = PruneReport(
        method=meth.name,
        sparsity=n / m if n else sparsity,
        pattern=pattern_name(n, m),
        nsamples=0 if calib is None else calib.shape[0],
        seqlen=0 if calib is None else calib.shape[1],
        device=str(dev),
        options=jsonable(
            {k: v for k, v in opts.items() if k not in _UNREPORTED}
            | ({"hessian_precision": hessian_precision} if meth.needs_calibration else {})
            | ({"allocation": allocation} if meth.needs_calibration else {})
        ),
    )
    totals = {"solve_seconds": 0.0, "forward_seconds": 0.0, "blocks": len(block_list)}
    # where the time goes (forward_seconds = capture + hessian forwards + propagation)
    totals.update(
        capture_seconds=0.0, hessian_seconds=0.0, propagate_seconds=0.0, inverse_seconds=0.0
    )

    def clock(key: str, t0: float) -> float:
        """Add the time since `t0` to `totals[key]` (after the device's queued work ends)."""
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        totals[key] += t - t0
        if key in ("capture_seconds", "hessian_seconds", "propagate_seconds"):
            totals["forward_seconds"] += t - t0
        return t

    show = progress and (comm is None or comm.rank == 0)
    G = None
    partial_G = False  # distributed GBLM: G holds this rank's raw sums until reduced
    if meth.needs_gradients:
        names = [f"{blocks_path}.{i}.{k}" for i, lins in enumerate(per_block) for k in lins]
        G = opts["gradients"]
        if G is None:
            with guard("the GBLM gradient passes"):
                t0 = time.perf_counter()
                G = compute_gradient_norms(
                    model,
                    local,
                    names,
                    dev,
                    opts["norm"],
                    opts["scale"],
                    show,
                    finalize=comm is None,
                )
                totals["gradient_seconds"] = time.perf_counter() - t0
            partial_G = comm is not None
        missing = [k for k in names if k not in G]
        if missing:
            raise ValueError(
                f"gradients has no entry for {missing[0]} (and {len(missing) - 1} more)"
            )

    was_training = model.training
    model.eval()
    block_sparsity = [sparsity] * len(block_list)
    if allocation == "owl":
        t0 = time.perf_counter()
        with guard("the OWL allocation pass"):
            ratios = outlier_ratios(
                model, block_list, layouts, kinds, local, batch_size, dev,
                offload_activations, owl_threshold, comm, moe_calibration,
            )  # fmt: skip
        params = [sum(get_weight(x).numel() for x in lins.values()) for lins in per_block]
        block_sparsity = owl_block_sparsities(ratios, params, sparsity, owl_lambda)
        totals["allocation_seconds"] = clock("forward_seconds", t0) - t0
        totals["allocation"] = {
            "rule": "owl", "threshold": owl_threshold, "lambda": owl_lambda,
            "outlier_ratios": ratios, "block_sparsity": block_sparsity,
        }  # fmt: skip
    acts = arg_sets = None
    if calib is not None:
        with guard("the capture of the first block's inputs"):
            t0 = time.perf_counter()
            acts = capture_inputs(
                model, block_list, kinds, local, batch_size, dev, offload_activations
            )
            clock("capture_seconds", t0)
            arg_sets = [(to_device(a, dev), to_device(k, dev)) for a, k in acts.arg_sets]
        totals["activation_bytes"] = acts.nbytes
        totals["activation_device"] = str(acts.inps.device)

    def shared_inverse(hooks, inverses, lead):
        """The inverse of the H of input group `lead`, one per distinct H (SparseGPT)."""
        if lead not in inverses:
            t0 = time.perf_counter()
            inverses[lead] = inverse_hessian(hooks.acc[lead].H, opts["percdamp"])
            clock("inverse_seconds", t0)
        return inverses[lead]

    def solve_layer(i, hooks, inverses, name, mod, rows=None):
        """Prune one linear of block `i` (or its `rows`, a slice) in place; its
        `LayerReport` (of those rows)."""
        full = f"{blocks_path}.{i}.{name}"
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
        if meth.shares_inverse and H is not None:
            hinv = shared_inverse(hooks, inverses, lead)
        g = None if G is None else G[full]
        r = meth.solve(W, H, g, block_sparsity[i], n, m, opts, hinv, rows)
        if rows is None:
            set_weight(mod, r.weight)
        else:
            with torch.no_grad():
                W[rows].copy_(r.weight)
        lr = _layer_report(i, name, W if rows is None else W[rows], method, r, lead)
        if tokens is not None:
            lr.info["tokens"] = int(tokens)
        return lr

    def solve_experts(i, hooks, inverses, group) -> dict[str, LayerReport]:
        """The experts of one projection of block `i` (`group`: (name, ExpertProjection)),
        their inverses computed as batches on a GPU (for a method sharing inverses), then,
        where the method solves such layers as batches (`Method.batches`), solved together
        in chunks; {name: report} of those solved."""
        leads = [hooks.leader[name] for name, _ in group]
        cols = hooks.acc[leads[0]].H.shape[0]
        chunk = max(1, EXPERT_BATCH_BYTES // (4 * cols * cols))
        out = {}
        for c0 in range(0, len(group), chunk):
            part, part_leads = group[c0 : c0 + chunk], leads[c0 : c0 + chunk]
            todo = sorted({ld for ld in part_leads if ld not in inverses})
            if meth.shares_inverse and todo and dev.type == "cuda":
                # one batched factorisation (on CPU, LAPACK one by one is faster: it stays
                # with solve_layer's own inverses)
                t0 = time.perf_counter()
                Hs = [hooks.acc[ld].H for ld in todo]
                inverses.update(zip(todo, inverse_hessians(Hs, opts["percdamp"])))
                clock("inverse_seconds", t0)
            if not meth.batches(opts, dev, get_weight(part[0][1]).shape):
                continue
            hinvs = None
            if meth.shares_inverse:
                hinvs = [shared_inverse(hooks, inverses, ld) for ld in part_leads]
            Ws = torch.stack([get_weight(layer).detach() for _, layer in part])
            Hs = [hooks.acc[ld].H for ld in part_leads]  # the accumulators' own, not a copy
            results = meth.solve_batch(Ws, Hs, block_sparsity[i], n, m, opts, hinvs)
            for (name, layer), ld, r in zip(part, part_leads, results):
                set_weight(layer, r.weight)
                lr = _layer_report(i, name, get_weight(layer), method, r, ld)
                lr.info["tokens"] = int(hooks.acc[ld].nsamples)
                out[name] = lr
        return out

    untouched: list[str] = []  # expert Hessians without a token (pruned with H = I)
    bar = tqdm(list(enumerate(block_list)), desc=f"{method} {report.pattern}", disable=not show)
    try:
        for i, block in bar:
            lins = per_block[i]
            hooks = None
            t0 = time.perf_counter()
            with guard(f"block {i}: its forward with the Hessian hooks"):
                block_home = next(block.parameters()).device
                block.to(dev)
                if acts is not None:
                    hooks = HessianHooks(block, layouts[i], dev, hessian_precision, moe_calibration)
                    try:
                        run_block(block, acts, batch_size, dev, arg_sets, kinds[i], hooks=hooks)
                    finally:
                        hooks.remove()
                    clock("hessian_seconds", t0)
            inverses = {}
            solve = functools.partial(solve_layer, i, hooks, inverses)
            if comm is None:
                batched = {}
                if hooks is not None:
                    untouched.extend(
                        f"{i}.{k}" for k in _identity_for_unrouted(hooks, f"{blocks_path}.{i}")
                    )
                    for group in _expert_groups(lins):
                        batched.update(solve_experts(i, hooks, inverses, group))
                done = [batched.get(name) or solve(name, mod) for name, mod in lins.items()]
            else:
                lead_of = {} if hooks is None else hooks.leader
                separable = meth.separable(n, opts)
                parts_of = comm.plan(lins, lead_of, meth.shares_inverse, separable)
                if hooks is not None:
                    comm.reduce_hessians(hooks, parts_of)
                    untouched.extend(
                        f"{i}.{k}" for k in _identity_for_unrouted(hooks, f"{blocks_path}.{i}")
                    )
                if partial_G:
                    full = {f"{blocks_path}.{i}.{k}": ps for k, ps in parts_of.items()}
                    comm.reduce_gradients(G, full, opts["norm"])
                done = comm.solve_block(lins, parts_of, solve, f"block {i}: its layer solves")
            for lr in done:
                totals["solve_seconds"] += lr.seconds
            report.layers.extend(done)
            del hooks, inverses, solve
            t0 = time.perf_counter()
            with guard(f"block {i}: the propagation through the pruned block"):
                if acts is not None and i + 1 < len(block_list):
                    run_block(block, acts, batch_size, dev, arg_sets, kinds[i])
                    acts.swap()
                    clock("propagate_seconds", t0)
                block.to(block_home)
            bar.set_postfix(block=i)
    finally:
        bar.close()
        model.train(was_training)

    params = sum(lr.shape[0] * lr.shape[1] for lr in report.layers)
    pruned = sum(lr.sparsity * lr.shape[0] * lr.shape[1] for lr in report.layers)
    report.achieved_sparsity = pruned / max(1, params)
    zeros, matrices = count_block_zeros(block_list)
    report.block_sparsity = zeros / max(1, matrices)
    losses = [lr.loss for lr in report.layers if lr.loss is not None]
    totals.update(params=params, layers=len(report.layers), blocks_path=blocks_path)
    totals.update(block_params=matrices, block_zeros=zeros)
    if any(bl.is_expert(k) for bl in layouts for k in bl.layers):
        totals["moe_calibration"] = moe_calibration
    report.dense = [
        {"name": f"{i}.{d.name}", "shape": list(d.shape), "reason": d.reason}
        for i, bl in enumerate(layouts)
        for d in bl.dense
    ]
    if untouched:
        totals["experts_without_tokens"] = untouched
    if losses:
        totals["loss"] = float(sum(losses))
    if comm is not None:
        own = totals["forward_seconds"] + totals.get("gradient_seconds", 0.0)
        totals.update(comm.gather_stats(own))
    report.totals = totals
    report.seconds = time.perf_counter() - t_start
    return report


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
            if acc.H is not None:
                acc.H = torch.eye(acc.cols, dtype=acc.H.dtype, device=acc.H.device)
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
        sparsity=1.0 - int(r.mask.sum().item()) / r.mask.numel(),
        loss=r.loss,
        seconds=float(r.info.get("seconds", 0.0)),
        hessian=None if lead is None else f"{i}.{lead}",
        info=jsonable({k: v for k, v in r.info.items() if k not in _INFO_SKIP}),
    )
