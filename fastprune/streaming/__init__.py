"""Streaming a model bigger than host memory through pruning: open and check a safetensors
checkpoint, build the model on the meta device, load and release one module's tensors at a
time, and write the result shard by shard into a folder that only looks finished when it is."""

from .checkpoint import (
    Checkpoint,
    Source,
    TensorInfo,
    available_host_memory,
    open_checkpoint,
    params_on_meta,
)
from .writer import (
    PARTIAL,
    CheckpointWriter,
    check_output,
    tensor_digest,
    verify_streamed,
)

__all__ = [
    "PARTIAL",
    "Checkpoint",
    "CheckpointWriter",
    "Source",
    "TensorInfo",
    "available_host_memory",
    "check_output",
    "open_checkpoint",
    "params_on_meta",
    "tensor_digest",
    "verify_streamed",
]
