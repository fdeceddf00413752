"""Where the decoder blocks live between `prune_model`'s stages (`BlockStore`): in the model
(`ResidentBlocks`) or streamed from a checkpoint (`fastprune.pipeline.stream`)."""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import TYPE_CHECKING

import torch
from torch import nn

from .block_layers import count_block_zeros

if TYPE_CHECKING:
    from .arguments import PruneArgs
    from .distributed import Comm


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

    def started(self, report) -> None:
        """The run's report, before any block (where a store writes what the solves keep)."""

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


def guarded(comm: Comm | None, what: str):
    """Distributed: a phase whose error every rank hears of (`Comm.guard`)."""
    return contextlib.nullcontext() if comm is None else comm.guard(what)
