"""`prune_model` on several processes (torch.distributed: gloo on CPU, NCCL on GPUs).

Every rank holds a full model replica and a disjoint, contiguous shard of the calibration
samples (`torch.tensor_split`). Per block:

1. each rank runs the block on its shard with the Hessian hooks, so rank r has
   `H_r = 2/n_r sum_{x in shard r} x x^T`; the exact `H = 2/n sum_x x x^T` is
   `sum_r (n_r H_r) / n` with `n = sum_r n_r`: each rank scales its `H_r` by `n_r` in
   float64, one `all_reduce(SUM)` adds them, and the sum is divided by `n` and rounded to
   float32. It differs from the single-process running update only in summation order
   (and is not bit-identical to it). Wanda's `diag(H)/2` comes from the same `H`.
2. the block's linears (grouped by shared input for methods that share an inverse) are given
   owner ranks by greedy largest-first bin packing on `rows * cols^2`; each owner solves its
   layers, the layer reports are gathered to every rank (which also surfaces an error on
   any rank to all of them, instead of a hang) and each pruned weight is broadcast from its
   owner;
3. every rank propagates its shard through the pruned block.

With a process group of size 1, or none, `prune_model` runs its single-process path.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from ..layers import get_weight


def active_world() -> int:
    """The process group's size when one is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) when WORLD_SIZE > 1 and none is initialised yet: NCCL when
    CUDA is available (each rank on `cuda:LOCAL_RANK`), else gloo. True if it did."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
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


class Comm:
    """The pipeline's collective steps on the default process group, with a byte count."""

    def __init__(self, device: torch.device):
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = dist.get_backend()
        # NCCL moves CUDA tensors only; gloo CPU tensors (keep it simple: CPU for gloo)
        self.device = device if self.backend == "nccl" else torch.device("cpu")
        self.bytes = 0  # payload of all_reduce / broadcast (each rank's send size)
        self.solve_seconds = 0.0

    def shard(self, calib: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous chunk of the calibration samples."""
        n = calib.shape[0]
        if self.world > n:
            raise ValueError(
                f"world_size {self.world} is larger than the number of calibration samples "
                f"{n}: every rank needs at least one sample (use more samples or fewer ranks)"
            )
        return torch.tensor_split(calib, self.world)[self.rank]

    def _check_same(self, what: str, value) -> None:
        got = [None] * self.world
        dist.all_gather_object(got, value)
        if any(g != got[0] for g in got):
            raise RuntimeError(f"ranks disagree on {what}: {got}")

    @torch.no_grad()
    def reduce_hessians(self, hooks) -> None:
        """Replace each rank's partial `H` (over its shard) with the exact one over all."""
        names = sorted(hooks.acc)
        self._check_same("the block's Hessian groups", names)
        for name in names:
            acc = hooks.acc[name]
            count = torch.tensor([float(acc.nsamples)], dtype=torch.float64, device=self.device)
            dist.all_reduce(count)
            buf = acc.H.to(self.device, torch.float64).mul_(acc.nsamples)
            dist.all_reduce(buf)
            self.bytes += buf.numel() * buf.element_size() + count.element_size()
            total = int(count.item())
            acc.H.copy_(buf.div_(total))
            acc.nsamples = total

    def solve_block(self, lins: dict[str, nn.Module], leader, shares_inverse, solve) -> list:
        """Solve the block's layers on their owners and broadcast the results; returns the
        layer reports in the order of `lins` (the same list on every rank). `solve(name,
        module)` prunes one layer in place and returns its report; `leader[name]` is the
        layer whose H it shares (None without calibration)."""
        names = list(lins)
        units: dict[str, list[str]] = {}
        for name in names:
            key = leader.get(name, name) if shares_inverse else name
            units.setdefault(key or name, []).append(name)
        groups = list(units.values())
        costs = []
        for g in groups:
            costs.append(sum(_cost(get_weight(lins[k])) for k in g))
        owners = assign_owners(costs, self.world)
        owner_of = {k: owners[i] for i, g in enumerate(groups) for k in g}
        mine, error = {}, None
        t0 = time.perf_counter()
        try:
            for name in names:
                if owner_of[name] == self.rank:
                    mine[name] = solve(name, lins[name])
        except Exception as e:  # every rank must hear of it, or the others hang
            error = e
        self.solve_seconds += time.perf_counter() - t0
        got = [None] * self.world
        dist.all_gather_object(got, (mine, None if error is None else repr(error)))
        if error is not None:
            raise error
        failed = [(r, e) for r, (_, e) in enumerate(got) if e is not None]
        if failed:
            raise RuntimeError(f"rank {failed[0][0]} failed to solve a layer: {failed[0][1]}")
        reports = {k: v for part, _ in got for k, v in part.items()}
        for name in names:
            self._broadcast_weight(lins[name], owner_of[name])
        return [reports[k] for k in names]

    @torch.no_grad()
    def _broadcast_weight(self, mod: nn.Module, src: int) -> None:
        w = mod.weight.data
        buf = w if w.device == self.device and w.is_contiguous() else w.to(self.device).contiguous()
        dist.broadcast(buf, src)
        self.bytes += buf.numel() * buf.element_size()
        if buf is not w:
            w.copy_(buf)

    def gather_stats(self) -> dict:
        """World size, each rank's solve seconds and communicated bytes (on every rank)."""
        got = [None] * self.world
        dist.all_gather_object(got, (self.solve_seconds, self.bytes))
        return {
            "world_size": self.world,
            "backend": self.backend,
            "rank_solve_seconds": [g[0] for g in got],
            "communicated_bytes": int(sum(g[1] for g in got)),
        }


def _cost(W: torch.Tensor) -> float:
    return float(W.shape[0]) * float(W.shape[1]) ** 2
