"""`prune_model`'s arguments checked and resolved before any work: the configuration by its
one check (`fastprune.config.check_config`), then what needs the model: the device, the
decoder blocks and every block's layers, the pattern against each layer, the calibration
tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PruneConfig, check_config
from ..layers import get_weight
from ..methods import Method
from ..models import find_blocks, model_device
from ..solvers.recipes import HELD_OUT_EVERY
from ..validation import check_pattern
from .block_layers import BlockLayers, check_selection, find_block_layers
from .capture import block_kinds


@dataclass
class PruneArgs:
    """`prune_model`'s arguments, checked and resolved: the configuration (its options read
    as attributes too: `args.batch_size`), the method that runs (composed with a refinement
    where asked) and its options, the pattern, the device, the decoder blocks and every
    block's layers, the calibration tokens."""

    model: nn.Module
    config: PruneConfig
    meth: Method
    opts: dict
    n: int
    m: int
    dev: torch.device
    blocks_path: str
    block_list: nn.ModuleList
    kinds: list
    layouts: list[BlockLayers]
    calib: torch.Tensor | None
    quant: Any = None  # the grid kept weights are rounded to (a QuantSpec), or None

    def __getattr__(self, name: str) -> Any:
        if name == "config":  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.config, name)

    @property
    def per_block(self) -> list[dict]:
        return [bl.layers for bl in self.layouts]


def resolve_device(device, home: torch.device) -> torch.device:
    """The device blocks run on (checked by the configuration): the model's by default, a
    CUDA device with its index."""
    if device is None:
        return home
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_prune_args(
    model: nn.Module, calibration, config: PruneConfig, tokenizer=None
) -> PruneArgs:
    """Every argument checked before any work (errors name the argument); the calibration
    tokens drawn."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    checked = check_config(config)
    cfg, meth = checked.config, checked.method
    n, m = cfg.prune_n, cfg.prune_m
    dev = resolve_device(cfg.device, model_device(model))
    blocks_path, block_list = find_blocks(model, cfg.blocks)
    kinds = block_kinds(model, len(block_list))
    check_selection(block_list, cfg.targets, cfg.ignore)
    layouts = [
        find_block_layers(b, cfg.targets, cfg.ignore, f"{blocks_path}.{i}")
        for i, b in enumerate(block_list)
    ]
    if not any(bl.layers for bl in layouts):
        raise ValueError("targets/ignore leave no layer to prune")
    if cfg.asymmetric:
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
            raise ValueError(f"method {cfg.method!r} needs calibration data (calibration=...)")
        from ..data import get_calibration

        calib = get_calibration(calibration, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab and calib.max().item() >= vocab:
            raise ValueError(f"calibration token ids exceed the model's vocab_size {vocab}")
    if meth.wants_held_out(checked.options):
        if cfg.asymmetric:
            raise ValueError("damping_levels takes no asymmetric calibration (asymmetric=True)")
        batches = -(-calib.shape[0] // cfg.batch_size)
        if batches < 2 * HELD_OUT_EVERY:
            raise ValueError(
                f"damping_levels holds out every {HELD_OUT_EVERY}th calibration batch: it needs "
                f"at least {2 * HELD_OUT_EVERY} batches (nsamples / batch_size), got {batches}"
            )
    return PruneArgs(
        model, cfg, meth, checked.options, n, m, dev, blocks_path, block_list, kinds, layouts,
        calib, checked.quant,
    )  # fmt: skip
