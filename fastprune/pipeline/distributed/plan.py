"""Which rank solves what: owners of whole layers (or shared-input groups) balanced by
solve cost, row ranges of separable layers cut across ranks, and the merged report of a
layer solved in parts."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from ...layers import get_weight


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


_PART_MAX = {"steps", "max_swaps", "damp", "damp_retries", "refit_iters", "refit_residual"}
_PART_SUM = {"swaps", "seconds", "pruned", "kept", "refit_rows_kept_start"}
_PART_MEAN = {"sparsity", "achieved_sparsity"}


# --------------------------------------------------------------------------- fingerprints
