"""`prune_model` on several processes (torch.distributed: gloo on CPU, NCCL on GPUs).

Every rank holds a full model replica and a disjoint, contiguous shard of the calibration
samples (`torch.tensor_split`). Before any work the ranks exchange a fingerprint of what they
were given (model, weights, calibration, method and options, ...) and refuse to start if it
differs (`check_consistent`). GBLM's gradient norms are accumulated per rank over its shard
(the raw sums: `sum_s (scale g_s)^2` for l2, `sum_s |scale g_s|` for l1). Per block:

1. each rank runs the block on its shard with the Hessian hooks, so rank r has
   `H_r = 2/n_r sum_{x in shard r} x x^T`; the exact `H = 2/n sum_x x x^T` is
   `sum_r (n_r H_r) / n` with `n = sum_r n_r`.
2. the block's linears (grouped by shared input for methods that share an inverse) are given
   owner ranks by greedy largest-first bin packing on `rows * cols^2` (`plan_block`); each
   `H` is summed in float64 (`n_r H_r`, then divided by `n` and rounded to float32) onto the
   owners of the layers that use it (`reduce` to one owner, `all_reduce` when several own
   layers fed the same input), and each layer's gradient-norm sums onto its owner (float64
   sum rounded to float32, then the l2 square root). Both differ from the single-process
   result only in summation order (they are not bit-identical to it). Wanda's `diag(H)/2`
   comes from the same `H`.
3. each owner solves its layers; the layer reports are gathered to every rank and each
   pruned weight is broadcast from its owner. For a method whose rows are solved
   independently (`Method.separable`: Wanda, GBLM, SparseSwaps, N:M SparseGPT/magnitude) a
   block the whole layers cannot balance has layers cut into row ranges on several ranks
   (`plan_block`, `FASTPRUNE_ROW_SPLIT`); each such rank gets the layer's full `H`, solves
   its rows (computing its own inverse) and broadcasts them, and the parts' reports are
   merged (`merge_part_reports`: losses summed);
4. every rank propagates its shard through the pruned block.

Faults: every local phase (setup, capture, gradients, a block's forward, solves,
propagation) runs under `Comm.guard`: an exception there is not raised at once but
exchanged at the end of the phase, so every rank stops together, the failing rank with its
own exception and the others with `RankFailedError` naming it; a rank that dies outright
(or hangs) makes the others' next collective fail, at the latest after the process group's
timeout (`init_from_env`: `FASTPRUNE_DIST_TIMEOUT` seconds, or `--dist-timeout`).

With a process group of size 1, or none, `prune_model` runs its single-process path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from ..layers import get_weight

DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "FASTPRUNE_DIST_TIMEOUT"
BACKEND_ENV = "FASTPRUNE_DIST_BACKEND"


class RankFailedError(RuntimeError):
    """Raised on every rank but the failing one when a rank failed in a guarded phase."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


class RankLostError(RuntimeError):
    """A collective failed: another rank died, or did not arrive within the timeout."""


def active_world() -> int:
    """The process group's size when one is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def dist_timeout(value=None, name: str = "timeout") -> float:
    """The collective timeout in seconds: `value` if given, else `$FASTPRUNE_DIST_TIMEOUT`,
    else 1800. Must be a finite number > 0 (the error names `name` or the variable)."""
    if value is None:
        env = os.environ.get(TIMEOUT_ENV, "").strip()
        if not env:
            return DEFAULT_TIMEOUT_S
        value, name = env, TIMEOUT_ENV
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return seconds


def choose_backend(device=None) -> str:
    """`$FASTPRUNE_DIST_BACKEND` if set (gloo | nccl); else gloo when `device` is a CPU device
    or this machine has fewer CUDA devices than local ranks, else NCCL (one GPU per rank)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in ("gloo", "nccl"):
            raise ValueError(f"{BACKEND_ENV} must be gloo or nccl, got {forced!r}")
        return forced
    if device is not None and torch.device(device).type == "cpu":
        return "gloo"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local:
        return "nccl"
    return "gloo"


def init_from_env(timeout=None, device=None) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT; `fastprune prune --nproc` sets the same) when WORLD_SIZE > 1
    and none is initialised yet. Backend: `choose_backend(device)`; with CUDA each rank's
    current device is `cuda:LOCAL_RANK`. `timeout` (seconds; default `dist_timeout()`) bounds
    every collective, so a rank that dies makes the others fail within it. True if it did."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    seconds = dist_timeout(timeout)
    backend = choose_backend(device)
    cpu_only = device is not None and torch.device(device).type == "cpu"
    if torch.cuda.is_available() and not cpu_only:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    return True


def assign_owners(costs: list[float], world: int) -> list[int]:
    """Owner rank of each unit: greedy largest-first bin packing (ties to the lower index and
    the lower rank, so every rank computes the same assignment)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def solve_cost(W: torch.Tensor) -> float:
    """The owner-balancing cost of one layer: rows * cols^2 (an OBS solve's work)."""
    return float(W.shape[0]) * float(W.shape[1]) ** 2


class Part(NamedTuple):
    """Rows `[start, stop)` of a layer, solved on `rank`."""

    rank: int
    start: int
    stop: int


ROW_SPLITS = ("auto", "always", "never")
ROW_SPLIT_ENV = "FASTPRUNE_ROW_SPLIT"


def row_split_mode(value: str | None = None) -> str:
    """`FASTPRUNE_ROW_SPLIT` (or `value`): when a distributed prune splits a layer's rows
    across ranks, for methods whose rows are solved independently (`Method.separable`):
    "auto" (a unit costlier than an even share of the block), "always" or "never"."""
    mode = os.environ.get(ROW_SPLIT_ENV, "auto") if value is None else value
    if mode not in ROW_SPLITS:
        raise ValueError(f"{ROW_SPLIT_ENV} must be one of {', '.join(ROW_SPLITS)}; got {mode!r}")
    return mode


SPLIT_SLACK = 0.05  # "auto" splits rows only when whole layers leave a rank 5% over an even share


def plan_block(
    lins: dict[str, nn.Module],
    leader: dict[str, str],
    shares_inverse: bool,
    world: int,
    separable: bool = False,
    row_split: str = "never",
) -> dict[str, list[Part]]:
    """{layer name: its parts}, for one block. Layers that share one inverse (q/k/v with
    SparseGPT) form one unit, every other layer is its own unit; units cost `solve_cost`.

    Whole units are bin-packed (greedy, largest first). For a `separable` method,
    `row_split="auto"` instead cuts rows when that packing leaves a rank more than
    `SPLIT_SLACK` over an even share `C` of the block: the units, largest first, fill rank 0
    up to `C`, then rank 1, ... (McNaughton's rule), so every rank gets `C` and at most
    `world - 1` units are cut, each into row ranges on consecutive ranks. "always" cuts every
    unit into `world` equal row ranges (a test of the machinery). A cut unit's part j is the
    same fraction of each of its layers, so a rank needs one inverse per unit it works on."""
    units: dict[str, list[str]] = {}
    for name in lins:
        key = (leader.get(name) or name) if shares_inverse else name
        units.setdefault(key, []).append(name)
    groups = list(units.values())
    rows = {k: get_weight(lins[k]).shape[0] for k in lins}
    costs = [sum(solve_cost(get_weight(lins[k])) for k in g) for g in groups]
    owners = assign_owners(costs, world)
    # per unit: [(rank, first fraction, last fraction)] of its rows
    pieces = [[(r, 0.0, 1.0)] for r in owners]
    if separable and world > 1 and row_split == "always":
        k = min(world, *(rows[n] for n in lins))
        parts = [(i, j) for i in range(len(groups)) for j in range(k)]
        ranks = assign_owners([costs[i] / k for i, _ in parts], world)
        pieces = [[] for _ in groups]
        for (i, j), r in zip(parts, ranks, strict=True):
            pieces[i].append((r, j / k, (j + 1) / k))
    elif separable and world > 1 and row_split == "auto":
        share = sum(costs) / world
        load = [0.0] * world
        for i, r in enumerate(owners):
            load[r] += costs[i]
        if max(load) > (1 + SPLIT_SLACK) * share:
            pieces = _fill_ranks(costs, world, share)
    plan: dict[str, list[Part]] = {}
    for i, g in enumerate(groups):
        for name in g:
            n, parts = rows[name], []
            for r, f0, f1 in pieces[i]:
                start, stop = round(f0 * n), n if f1 >= 1.0 else round(f1 * n)
                if stop > start:
                    parts.append(Part(r, start, stop))
            plan[name] = parts
    return plan


def _fill_ranks(costs: list[float], world: int, share: float) -> list[list]:
    """McNaughton's wrap-around rule: units largest first fill each rank up to `share`; a
    unit crossing a rank's end continues on the next. Per unit its (rank, f0, f1) pieces."""
    pieces: list[list] = [[] for _ in costs]
    rank, fill = 0, 0.0
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        left, f0 = costs[i], 0.0
        while left > 0:
            room = float("inf") if rank == world - 1 else share - fill
            take = min(left, room)
            f1 = 1.0 if take >= left else f0 + take / costs[i]
            pieces[i].append((rank, f0, f1))
            fill, left, f0 = fill + take, left - take, f1
            if rank < world - 1 and fill >= share * (1 - 1e-9):
                rank, fill = rank + 1, 0.0
        if not pieces[i]:  # a unit of no cost
            pieces[i].append((rank, 0.0, 1.0))
    return pieces


def merge_part_reports(parts: list, shape: tuple[int, int]):
    """One `LayerReport` from those of a layer's row parts (in row order): losses, seconds
    and counters summed, sparsities weighted by rows, step counts the largest, `converged`
    only if every part converged; other info fields kept where the parts agree, else listed
    per part. `info["row_parts"]` records the rows each part had."""
    first = parts[0]
    sizes = [p.shape[0] for p in parts]
    info: dict = {}
    for key in dict.fromkeys(k for p in parts for k in p.info):
        vals = [p.info.get(key) for p in parts]
        if all(v == vals[0] for v in vals):
            info[key] = vals[0]
        elif key in _PART_MAX:
            info[key] = max(vals)
        elif key == "converged":
            info[key] = all(vals)
        elif key in _PART_MEAN:
            info[key] = sum(v * r for v, r in zip(vals, sizes, strict=True)) / sum(sizes)
        elif key in _PART_SUM or key.startswith("loss"):
            info[key] = None if None in vals else sum(vals)
        else:
            info[key] = vals
    info["row_parts"] = sizes
    losses = [p.loss for p in parts]
    return type(first)(
        name=first.name,
        block=first.block,
        shape=tuple(shape),
        method=first.method,
        sparsity=sum(p.sparsity * r for p, r in zip(parts, sizes, strict=True)) / sum(sizes),
        loss=None if None in losses else float(sum(losses)),
        seconds=float(sum(p.seconds for p in parts)),
        hessian=first.hessian,
        info=info,
    )


_PART_MAX = {"steps", "max_swaps", "damp", "damp_retries"}
_PART_SUM = {"swaps", "seconds", "pruned", "kept"}
_PART_MEAN = {"sparsity", "achieved_sparsity"}


# --------------------------------------------------------------------------- fingerprints


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _sample_bytes(t: torch.Tensor, count: int = 4096) -> bytes:
    """The bytes of up to `count` evenly strided elements of `t` (as float64 for floats)."""
    if t.device.type == "meta" or t.numel() == 0:
        return b""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // count)
    s = flat[::step][:count]
    s = s.to(torch.float64) if s.is_floating_point() else s.to(torch.int64)
    return s.cpu().numpy().tobytes()


def weights_checksum(model: nn.Module) -> str:
    """A cheap checksum of a model's parameters: names, shapes, dtypes and a strided sample
    of each one's values (two replicas of one checkpoint agree; different weights almost
    surely differ)."""
    h = hashlib.blake2b(digest_size=8)
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(_sample_bytes(p))
    return h.hexdigest()


def _config_digest(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    d = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and k != "name_or_path"}
    return _digest(json.dumps(d, sort_keys=True, default=str).encode())


def _value(x):
    """A comparable, printable stand-in for an option value (tensors and dicts of tensors
    by checksum)."""
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)} {_digest(_sample_bytes(x, 1 << 16))}"
    if isinstance(x, dict):
        return {str(k): _value(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, list | tuple):
        return [_value(v) for v in x]
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return repr(x)


def fingerprint(model: nn.Module, calib: torch.Tensor | None, **fields) -> dict:
    """What every rank must agree on before a distributed prune: the model (class, config,
    parameter count, `weights_checksum`), the calibration tokens (shape and checksum) and
    `fields` (method, sparsity, options, ...), plus the fastprune and torch versions."""
    from .. import __version__

    fp = {
        "model class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model config": _config_digest(model),
        "parameter count": sum(p.numel() for p in model.parameters()),
        "weights checksum": weights_checksum(model),
        "calibration shape": None if calib is None else tuple(calib.shape),
        "calibration tokens checksum": (
            None if calib is None else _digest(calib.detach().cpu().numpy().tobytes())
        ),
    }
    fp.update({k: _value(v) for k, v in fields.items()})
    fp["fastprune version"] = __version__
    fp["torch version"] = torch.__version__
    return fp


def _short(v, width: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= width else s[: width - 3] + "..."


def _ranks(rs: list[int]) -> str:
    return ("rank " if len(rs) == 1 else "ranks ") + ", ".join(map(str, rs))


def disagreement(fingerprints: list[dict]) -> str | None:
    """None when every rank's fingerprint is the same, else a message naming the first
    differing field, each value with the ranks that have it, and any other differing
    fields."""
    keys = list(dict.fromkeys(k for f in fingerprints for k in f))
    bad = [k for k in keys if any(f.get(k) != fingerprints[0].get(k) for f in fingerprints)]
    if not bad:
        return None
    k = bad[0]
    by_value: dict[str, list[int]] = {}
    for r, f in enumerate(fingerprints):
        by_value.setdefault(_short(f.get(k)), []).append(r)
    parts = "; ".join(f"{_ranks(rs)}: {v}" for v, rs in by_value.items())
    more = f" (also differ: {', '.join(bad[1:])})" if len(bad) > 1 else ""
    return (
        f"ranks disagree on {k}: {parts}{more}. Every rank must prune the same model with the "
        "same arguments and calibration data"
    )


# ---------------------------------------------------------------------------------- Comm


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
                acc.H.copy_(buf.div_(total))
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
