"""The pipeline's collective steps (`Comm`): guarded phases, Hessian and gradient
reductions, the plan exchange, layer solves and weight broadcasts, and the report's totals."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from ...layers import get_weight
from ...quant import QuantizedWeight
from .fingerprint import disagreement
from .group import RankFailedError, RankLostError
from .plan import Part, merge_part_reports, plan_block, row_split_mode


class Comm:
    """The pipeline's collective steps on the default process group, with byte and time
    counts for the report."""

    def __init__(self):
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = dist.get_backend()
        # NCCL moves CUDA tensors only (this rank's current device); gloo: CPU tensors
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.reduced_bytes = 0  # payload of the H / gradient reductions (per rank's send)
        self.broadcast_bytes = 0  # payload of the weight broadcasts
        self.solve_seconds = 0.0  # this rank's own solves
        self.comm_seconds = 0.0  # inside collectives (includes waiting for other ranks)
        self.row_split = row_split_mode()

    @contextlib.contextmanager
    def _talk(self, what: str):
        """Time a collective step; its failure (a rank died or timed out) as `RankLostError`
        naming the step."""
        t0 = time.perf_counter()
        try:
            yield
        except (RuntimeError, dist.DistError) as e:
            if isinstance(e, RankFailedError | RankLostError):
                raise
            raise RankLostError(
                f"rank {self.rank} lost the other ranks in {what} after "
                f"{time.perf_counter() - t0:.1f}s (another rank died or did not arrive within "
                f"the process group's timeout): {type(e).__name__}: {e}"
            ) from e
        finally:
            self.comm_seconds += time.perf_counter() - t0

    # -------------------------------------------------------------- faults and consistency

    @contextlib.contextmanager
    def guard(self, what: str):
        """Run the body on this rank; at its end every rank learns whether any rank raised
        in it. The failing rank re-raises its own exception, the others raise
        `RankFailedError` naming it and its error. No collective may run inside the body."""
        error = None
        try:
            yield
        except Exception as e:  # exchanged below: the others must hear of it, or they hang
            error = e
        self.check(what, error)

    def check(self, what: str, error: BaseException | None) -> None:
        """The exchange at the end of a guarded phase (see `guard`)."""
        with self._talk(f"the check at the end of {what}"):
            flags = torch.zeros(self.world, dtype=torch.int32, device=self.device)
            if error is not None:
                flags[self.rank] = 1
            dist.all_reduce(flags)
            failed = [r for r, f in enumerate(flags.tolist()) if f]
            if failed:
                msgs = [None] * self.world
                mine = None if error is None else f"{type(error).__name__}: {error}"
                dist.all_gather_object(msgs, mine)
        if not failed:
            return
        if error is not None:
            raise error
        r = failed[0]
        others = f" (ranks {', '.join(map(str, failed[1:]))} failed too)" if failed[1:] else ""
        raise RankFailedError(f"rank {r} failed in {what}: {msgs[r]}{others}", failed)

    def check_consistent(self, fp: dict) -> None:
        """Refuse (ValueError naming the field and the ranks) unless every rank's
        `fingerprint` is the same."""
        got = self._gather(fp, "the consistency check at the start")
        msg = disagreement(got)
        if msg:
            raise ValueError(msg)

    def _gather(self, obj, what: str) -> list:
        got = [None] * self.world
        with self._talk(what):
            dist.all_gather_object(got, obj)
        return got

    def shard(self, calib: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous chunk of the calibration samples."""
        n = calib.shape[0]
        if self.world > n:
            raise ValueError(
                f"world_size {self.world} is larger than the number of calibration samples "
                f"{n}: every rank needs at least one sample (use more samples or fewer ranks)"
            )
        return torch.tensor_split(calib, self.world)[self.rank]

    # ------------------------------------------------------------------------ one block

    def plan(
        self,
        lins: dict[str, nn.Module],
        leader: dict[str, str],
        shares_inverse: bool,
        separable: bool = False,
    ) -> dict[str, list[Part]]:
        """`plan_block` (with this group's row-split mode), after checking every rank saw the
        same Hessian groups."""
        got = self._gather(sorted(leader.items()), "the exchange of the block's Hessian groups")
        if any(g != got[0] for g in got):
            raise RuntimeError(f"ranks disagree on the block's Hessian groups: {got}")
        return plan_block(lins, leader, shares_inverse, self.world, separable, self.row_split)

    @torch.no_grad()
    def reduce_hessians(self, hooks, parts_of: dict[str, list[Part]]) -> None:
        """Sum the ranks' partial `H`s onto the ranks that solve (part of) a layer using them: there
        `acc.H` becomes the exact `H` over all samples; elsewhere it is dropped (None)."""
        names = sorted(hooks.acc)
        counts = torch.tensor(
            [float(hooks.acc[k].nsamples) for k in names], dtype=torch.float64, device=self.device
        )
        with self._talk("the Hessian reduction"):
            dist.all_reduce(counts)
        self.reduced_bytes += counts.numel() * counts.element_size()
        for j, name in enumerate(names):
            acc = hooks.acc[name]
            dests = sorted(
                {p.rank for k, lead in hooks.leader.items() if lead == name for p in parts_of[k]}
            )
            buf = acc.H.to(self.device, torch.float64).mul_(acc.nsamples)
            self._sum_onto(buf, dests, "the Hessian reduction")
            total = int(counts[j].item())
            if self.rank in dests:
                acc.H = buf.div_(total).to(acc.H)  # a full H or its diagonal
                acc.nsamples = total
            else:
                acc.H = None

    @torch.no_grad()
    def reduce_gradients(
        self, partial: dict[str, torch.Tensor], parts_of: dict[str, list[Part]], norm: str
    ) -> None:
        """GBLM: replace this block's raw gradient-norm sums (`partial[name]`, float32) by the
        finished `G` on the ranks that solve (part of) each layer (the float64 sum over ranks
        rounded to float32, then its square root for l2); other ranks drop theirs."""
        for name, parts in parts_of.items():
            dests = sorted({p.rank for p in parts})
            buf = partial[name].to(self.device, torch.float64)
            self._sum_onto(buf, dests, "the gradient-norm reduction")
            if self.rank in dests:
                total = buf.to(torch.float32).cpu()
                partial[name] = total.sqrt_() if norm == "l2" else total
            else:
                del partial[name]

    def _sum_onto(self, buf: torch.Tensor, dests: list[int], what: str) -> None:
        with self._talk(what):
            if len(dests) == 1:
                dist.reduce(buf, dests[0])
            else:
                dist.all_reduce(buf)
        self.reduced_bytes += buf.numel() * buf.element_size()

    def solve_block(
        self,
        lins: dict[str, nn.Module],
        parts_of: dict[str, list[Part]],
        solve,
        what: str = "the solves",
    ) -> list:
        """Solve the block's layers (or their row parts) on their ranks and broadcast the
        results; returns the layer reports in the order of `lins` (the same list on every
        rank). `solve(name, module, rows)` prunes those rows of one layer in place (`rows`
        None: the whole layer) and returns its report. An error on any rank stops every
        rank (as `guard`)."""
        mine, error = {}, None
        t0 = time.perf_counter()
        try:
            for name, mod in lins.items():
                parts = parts_of[name]
                for j, p in enumerate(parts):
                    if p.rank == self.rank:
                        rows = None if len(parts) == 1 else slice(p.start, p.stop)
                        mine[name, j] = solve(name, mod, rows)
        except Exception as e:  # every rank must hear of it, or the others hang
            error = e
        self.solve_seconds += time.perf_counter() - t0
        msg = None if error is None else f"{type(error).__name__}: {error}"
        got = self._gather((mine, msg), f"the exchange of the layer reports after {what}")
        failed = [r for r, (_, e) in enumerate(got) if e is not None]
        if error is not None:
            raise error
        if failed:
            r = failed[0]
            raise RankFailedError(f"rank {r} failed in {what}: {got[r][1]}", failed)
        reports = {k: v for part, _ in got for k, v in part.items()}
        with self._talk("the broadcast of the pruned weights"):
            for name, mod in lins.items():
                for p in parts_of[name]:
                    self._broadcast_rows(mod, p)
        done = []
        for name, mod in lins.items():
            parts = [reports[name, j] for j in range(len(parts_of[name]))]
            shape = tuple(get_weight(mod).shape)
            done.append(parts[0] if len(parts) == 1 else merge_part_reports(parts, shape))
        return done

    @torch.no_grad()
    def share_quantized(self, quantized: dict, names: list[str]) -> None:
        """A block's quantized layers (`names`, each in `quantized` on the rank that solved
        it) given to every rank, in the order of `names`: every rank's report then holds the
        codes and grids one process would (rank 0 saves them). Each layer's grid and tensor
        shapes are exchanged, then its tensors broadcast from its owner."""
        mine = {n: _described(quantized[n]) for n in names if n in quantized}
        got = self._gather(mine, "the exchange of the quantized layers' grids")
        owner = {n: (r, desc) for r, part in enumerate(got) for n, desc in part.items()}
        with self._talk("the broadcast of the quantized layers"):
            for n in names:
                ours = quantized.pop(n, None)
                if n not in owner:
                    continue
                r, desc = owner[n]
                fields = {}
                for k, v in desc.items():
                    if isinstance(v, _TensorMeta):
                        t = (
                            getattr(ours, k)
                            if r == self.rank
                            else torch.empty(v.shape, dtype=v.dtype)
                        )
                        v = self._broadcast_tensor(t, r)
                    fields[k] = v
                quantized[n] = QuantizedWeight(**fields)

    def _broadcast_tensor(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """`t` from rank `src` (float8 as its bytes: not every backend moves it), on the CPU."""
        raw = t.contiguous()
        if raw.dtype.is_floating_point and raw.element_size() == 1:
            raw = raw.view(torch.uint8)
        buf = raw.to(self.device)
        dist.broadcast(buf, src)
        self.broadcast_bytes += buf.numel() * buf.element_size()
        return buf.cpu().view(t.dtype)

    @torch.no_grad()
    def _broadcast_rows(self, mod: nn.Module, part: Part) -> None:
        """Rows `part.start:part.stop` of a layer's `[rows, cols]` weight, from `part.rank`."""
        w = get_weight(mod).detach()
        if part.start or part.stop < w.shape[0]:
            w = w[part.start : part.stop]
        else:
            w = mod.weight.detach()  # all of it, in its own (contiguous) layout
        buf = w if w.device == self.device and w.is_contiguous() else w.to(self.device).contiguous()
        dist.broadcast(buf, part.rank)
        self.broadcast_bytes += buf.numel() * buf.element_size()
        if buf is not w:
            w.copy_(buf)

    def gather_stats(self, calibration_seconds: float) -> dict:
        """The report's distributed totals (the same on every rank): world size, backend,
        each rank's calibration (its own forwards, Hessians, gradients), solve and
        collective seconds, and the bytes communicated (sum over ranks of each one's
        payload: reductions of H and gradient norms, weight broadcasts)."""
        mine = (calibration_seconds, self.solve_seconds, self.comm_seconds)
        mine += (self.reduced_bytes, self.broadcast_bytes)
        got = self._gather(mine, "the exchange of the report's totals")
        reduced = int(sum(g[3] for g in got))
        broadcast = int(sum(g[4] for g in got))
        return {
            "world_size": self.world,
            "backend": self.backend,
            "rank_calibration_seconds": [g[0] for g in got],
            "rank_solve_seconds": [g[1] for g in got],
            "rank_comm_seconds": [g[2] for g in got],
            "reduced_bytes": reduced,
            "broadcast_bytes": broadcast,
            "communicated_bytes": reduced + broadcast,
        }


class _TensorMeta(NamedTuple):
    """A tensor field of a `QuantizedWeight` as another rank allocates it."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _described(q: QuantizedWeight) -> dict:
    """A `QuantizedWeight`'s fields with its tensors as their shapes and dtypes."""
    fields = {f.name: getattr(q, f.name) for f in dataclasses.fields(q)}
    return {
        k: _TensorMeta(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v
        for k, v in fields.items()
    }
