"""Ops layer: five ops, each with a contract, a torch reference and fused versions.

Each op is found by its name alone: `fastprune/ops/<op>.py` (contract, typed result, torch
version), `triton_kernels/<op>.py` (Triton), `csrc/<op>.cu` (CUDA, where hand-written).
Solvers call them through `Kernels` (`dispatch.py`), which picks the implementation and
records what ran. `obs_sweep` and `block_prune_mask` also have a batched form (a leading
layer dimension, `BATCH_RANK`); each backend declares which it takes (`backend_batched`),
and which take the `quant=` option (`QUANT_OPS`, `backend_quant`).
"""

from .block_prune_mask import torch_block_prune_mask
from .column_losses import ColumnLosses, torch_column_losses
from .dispatch import (
    BACKENDS,
    BATCH_RANK,
    OPS,
    QUANT_OPS,
    TORCH_OPS,
    BackendUnavailableError,
    Kernels,
    backend_batched,
    backend_ops,
    backend_quant,
    get_op,
    resolve_backend,
)
from .obs_sweep import ObsSweep, QuantBlock, torch_obs_sweep
from .swap_apply import torch_swap_apply
from .swap_search import SwapSearch, torch_swap_search

__all__ = [
    "BACKENDS",
    "BATCH_RANK",
    "OPS",
    "QUANT_OPS",
    "QuantBlock",
    "TORCH_OPS",
    "BackendUnavailableError",
    "ColumnLosses",
    "Kernels",
    "ObsSweep",
    "SwapSearch",
    "backend_batched",
    "backend_ops",
    "backend_quant",
    "get_op",
    "resolve_backend",
    "torch_block_prune_mask",
    "torch_column_losses",
    "torch_obs_sweep",
    "torch_swap_apply",
    "torch_swap_search",
]
