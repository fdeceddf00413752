"""The layer solves of one decoder block: each linear on its own (`LayerSolves._solve_layer`),
the experts of one projection as batches (`_solve_experts`), one shared inverse per distinct
H, and the report of each layer (with its quantized weights, where the solve quantized)."""

from __future__ import annotations

import logging
import time

import torch

from ..hessian import DEFAULT_PERCDAMP, inverse_hessian
from ..layers import get_weight, set_weight
from ..masks import pruned_fraction
from ..solvers.sparsegpt_batched import inverse_hessians
from .asymmetric import asymmetric_target
from .experts import ExpertProjection
from .report import LayerReport, jsonable

logger = logging.getLogger("fastprune")
_INFO_SKIP = {"shape", "device", "method"}
# at most this many bytes of stacked expert Hessians per batched inverse / solve
EXPERT_BATCH_BYTES = 1 << 30


class LayerSolves:
    """The layer solves of `PruneRun` (its `args`, `G`, `block_sparsity`, `clock`)."""

    @property
    def reads_scaler(self) -> bool:
        """Whether the solves read the running scaler of their inputs (ROSE's
        `score_scaler="running"`): the Hessian hooks then accumulate it beside each `H`."""
        return self.args.meth.wants_scaler(self.args.opts)

    def _shared_inverse(self, hooks, inverses, lead):
        """The inverse of the H of input group `lead`, one per distinct H (SparseGPT)."""
        if lead not in inverses:
            t0 = time.perf_counter()
            percdamp = self.args.opts.get("percdamp", DEFAULT_PERCDAMP)
            inverses[lead] = inverse_hessian(hooks.acc[lead].H, percdamp)
            self.clock("inverse_seconds", t0)
        return inverses[lead]

    def _solve_layer(self, i, hooks, inverses, name, mod, rows=None):
        """Prune one linear of block `i` (or its `rows`, a slice) in place; its
        `LayerReport` (of those rows)."""
        a = self.args
        full = f"{a.blocks_path}.{i}.{name}"
        W = get_weight(mod).detach()
        H = lead = hinv = tokens = scaler = held = None
        if hooks is not None:
            lead = hooks.leader.get(name)
            if lead is None:
                raise RuntimeError(f"{full} was never called in the block's forward")
            H = hooks.acc[lead].H
            if hooks.scalers is not None:  # the running scaler of the same inputs
                scaler = hooks.scalers[lead].scaler_row
            if a.meth.wants_held_out(a.opts):  # the held-out slice's split of H
                held = hooks.held_out_pair(lead)
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
        sparsity = self.block_sparsity[i]
        r = a.meth.solve(
            target, H, g, sparsity, a.n, a.m, a.opts, hinv, rows, quant=a.quant,
            scaler_row=scaler, held_out=held,
        )  # fmt: skip
        if r.quant is not None and rows is None:
            set_weight(mod, as_stored(r.quant, W.dtype))
        elif rows is None:
            set_weight(mod, r.weight)
        else:
            with torch.no_grad():
                W[rows].copy_(r.weight)
        lr = _layer_report(i, name, W if rows is None else W[rows], a.method, r, lead)
        self._keep_quant(full, lr, r)
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
            batch = meth.batches(opts, dev, get_weight(part[0][1]).shape)
            if not batch or meth.wants_scaler(opts):  # a batch solve takes no running scaler
                continue
            hinvs = None
            if meth.wants_inverse(a.n, opts):
                hinvs = [self._shared_inverse(hooks, inverses, ld) for ld in part_leads]
            Ws = torch.stack([get_weight(layer).detach() for _, layer in part])
            Hs = [hooks.acc[ld].H for ld in part_leads]  # the accumulators' own, not a copy
            sparsity = self.block_sparsity[i]
            results = meth.solve_batch(Ws, Hs, sparsity, a.n, a.m, opts, hinvs, quant=a.quant)
            for (name, layer), ld, W, r in zip(part, part_leads, Ws, results):
                set_weight(layer, r.weight if r.quant is None else as_stored(r.quant, W.dtype))
                lr = _layer_report(i, name, get_weight(layer), a.method, r, ld)
                self._keep_quant(f"{a.blocks_path}.{i}.{name}", lr, r)
                lr.info["tokens"] = int(hooks.acc[ld].nsamples)
                out[name] = lr
        return out

    def _keep_quant(self, full: str, lr: LayerReport, r) -> None:
        """A quantized layer's codes and grids kept beside the model (on CPU) for a quantized
        checkpoint, its bytes in its report."""
        if r.quant is not None:
            self.report.quantized[full] = quantized_on_cpu(r.quant)
            lr.info.setdefault("quant", {})["bytes"] = r.quant.nbytes()


def expert_groups(lins: dict) -> list[list[tuple[str, ExpertProjection]]]:
    """The block's experts by projection (one fused parameter each), groups of 2 or more."""
    groups: dict[tuple[int, str], list] = {}
    for name, layer in lins.items():
        if isinstance(layer, ExpertProjection):
            groups.setdefault((id(layer.experts.module), layer.proj), []).append((name, layer))
    return [g for g in groups.values() if len(g) > 1]


def identity_for_unrouted(hooks, block: str) -> list[str]:
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


def as_stored(q, dtype: torch.dtype) -> torch.Tensor:
    """A quantized layer's weight as a runtime computes it from a checkpoint that stores its
    scales in the model's `dtype`: `(codes - zero) * scale` in that dtype (the solver's float32
    dequantization cast to `dtype`, up to the rounding of the scales), so the model in memory
    is the model saved."""
    g = q.groups()
    scale = q.scale.to(dtype)[:, g]
    if q.zero is None:  # fp8: the float8 values times their row's scale
        return q.codes.to(dtype) * scale
    return (q.codes.to(torch.int16) - q.zero.to(torch.int16)[:, g]).to(dtype) * scale


def quantized_on_cpu(q):
    """A `QuantizedWeight` with its tensors on the CPU (the model's memory stays the model's)."""
    import dataclasses

    moved = {
        f.name: getattr(q, f.name).cpu()
        for f in dataclasses.fields(q)
        if isinstance(getattr(q, f.name), torch.Tensor)
    }
    return dataclasses.replace(q, **moved)


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
