"""`PruneRun`: one `prune_model` call's state and its named stages (agree, gradients,
allocate, capture, and per block calibrate, solve, propagate; finish)."""

from __future__ import annotations

import contextlib
import functools
import logging
import time

import torch
from tqdm.auto import tqdm

from ..config import agreed
from ..layers import get_weight
from ..masks import pattern_name
from ..solvers.recipes import HELD_OUT_EVERY
from .allocation import outlier_ratios, owl_block_sparsities
from .arguments import PruneArgs
from .blockstore import BlockStore, guarded, peak_host_memory
from .capture import capture_inputs, run_block, run_block_paired, to_device
from .distributed import Comm, fingerprint
from .gradients import compute_gradient_norms
from .hessian_hooks import HessianHooks, PairedHessianHooks
from .layer_solves import LayerSolves, expert_groups, identity_for_unrouted
from .preflight import has_experts, own_kinds, preflight
from .report import PruneReport, jsonable, quant_totals

logger = logging.getLogger("fastprune")
_UNREPORTED = {"gradients"}  # precomputed {name: G}: not an option worth a report line


class PruneRun(LayerSolves):
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
                | ({"quant": a.quant.as_info()} if a.quant is not None else {})
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
        self.blocks_done = 0  # blocks pruned and propagated so far

    def guard(self, what: str):
        return guarded(self.comm, what)

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
        self.comm.check_consistent(
            fingerprint(
                a.model,
                a.calib,
                **agreed(a.config),
                options=a.opts,
                blocks=a.blocks_path,
                checkpoint=self.store.identity(),
                **{"device type": a.dev.type, "row split": self.comm.row_split},
            )
        )

    def preflight(self) -> None:
        """Before any weight changes: one forward of the first calibration sample with every
        block and planned layer hooked (`fastprune.pipeline.preflight`): what would not
        calibrate right is refused, routers found by structure are left dense, blocks whose
        replay needs their own arguments get them. Every rank runs it on the same sample, so
        all reach the same verdict. Streamed, each block is loaded when the forward calls it
        and released once replayed (two blocks' weights held at most)."""
        a = self.args
        from ..models import model_device

        if a.calib is not None:
            sample = a.calib[:1]
        elif has_experts(a.block_list, a.layouts):  # routers matter to magnitude too
            vocab = getattr(getattr(a.model, "config", None), "vocab_size", None) or 2
            sample = (torch.arange(16) % vocab).unsqueeze(0)
        else:
            return
        on_demand = self.store.on_demand(a) if self.store.streamed else None
        with self.guard("the pre-flight forward"):
            verdict = preflight(
                a.model, a.block_list, a.layouts, a.kinds, a.blocks_path,
                sample.to(model_device(a.model)), replay=a.calib is not None, on_demand=on_demand,
            )  # fmt: skip
        a.kinds = own_kinds(a.kinds, verdict)
        self.totals["preflight"] = verdict.summary()

    def interrupted(self, e: BaseException) -> None:
        """An error in the middle of the run: say (a note on `e`, `e.pruned_blocks`, the log)
        which blocks were pruned; the model holds those pruned and the rest dense."""
        a, done = self.args, self.blocks_done
        partial = [lr.name for lr in self.report.layers if lr.block == done]
        if done == 0 and not partial:
            msg = "fastprune: stopped before any weight changed; the model is unchanged"
        else:
            msg = (
                f"fastprune: stopped in block {done} of {len(a.block_list)}: blocks 0..{done - 1}"
                f" of {a.blocks_path} are pruned, the rest dense"
                if done
                else f"fastprune: stopped in block 0 of {a.blocks_path}"
            )
            if partial:
                msg += f" (block {done}: {len(partial)} layers pruned before the stop)"
        try:
            e.pruned_blocks = list(range(done))
            e.add_note(msg)
        except (AttributeError, TypeError):
            pass
        if done or partial:
            logger.error(msg)

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
        # streamed, blocks with arguments of their own (`own_kinds`) have them captured by
        # running the blocks before them, each loaded when called and released when it returns
        streamed = self.store.streamed and len(set(a.kinds)) > 1
        on_demand = self.store.on_demand(a).hooked() if streamed else contextlib.nullcontext()
        with self.guard("the capture of the first block's inputs"), on_demand:
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
                block, a.layouts[i], a.dev, a.hessian_precision, a.moe_calibration, a.hessian_kind,
                scaler=self.reads_scaler,
                held_out_every=HELD_OUT_EVERY if a.meth.wants_held_out(a.opts) else 0,
            )  # fmt: skip
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
                self.untouched.extend(f"{i}.{k}" for k in identity_for_unrouted(hooks, block_name))
                for group in expert_groups(lins):
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
            # a quantized layer is solved whole on its owner: its grids and grid error are
            # the layer's (row parts would each report their own)
            separable = a.meth.separable(a.n, a.opts) and a.quant is None
            parts_of = comm.plan(lins, lead_of, a.meth.shares_inverse, separable)
            if hooks is not None:
                comm.reduce_hessians(hooks, parts_of)
                self.untouched.extend(f"{i}.{k}" for k in identity_for_unrouted(hooks, block_name))
            if self.partial_G:
                full = {f"{block_name}.{k}": ps for k, ps in parts_of.items()}
                comm.reduce_gradients(self.G, full, a.opts["norm"])
            done = comm.solve_block(lins, parts_of, solve, f"block {i}: its layer solves")
            if a.quant is not None:  # every rank keeps every layer's codes, as one process
                comm.share_quantized(self.report.quantized, [f"{block_name}.{k}" for k in lins])
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
        self.blocks_done = i + 1
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
        quant = quant_totals(report.layers)
        if quant is not None:
            totals["quant"] = quant
        if self.comm is not None:
            own = totals["forward_seconds"] + totals.get("gradient_seconds", 0.0)
            totals.update(self.comm.gather_stats(own))
        report.totals = totals
        report.seconds = time.perf_counter() - self.t_start
        return report
