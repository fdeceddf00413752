"""Pruning a checkpoint bigger than host memory, one decoder block at a time.

`prune_checkpoint(path, save, ...)` builds the model on the meta device from the checkpoint's
config, loads what lies outside the decoder blocks (embeddings, final norm, head), runs the
pre-flight on the model's forward with each block loaded when called and released once
replayed (`BlocksOnDemand`: those modules and at most two blocks held), captures the
calibration inputs of the first block, opens the output (the modules outside the blocks
written out unchanged at once) and then, per block, loads only that block's tensors from the
shards, calibrates, prunes, propagates, writes the pruned tensors (in the checkpoint's own
layout) and frees the block. `prune_model`'s stages
run unchanged: only where a block lives between them differs (`StreamedBlocks` here,
`ResidentBlocks` in memory), so the pruned weights equal the in-memory path's bit for bit.

The output is a normal Hugging Face checkpoint (sharded safetensors with an index, config,
generation config, tokenizer, `fastprune_report.json`), written into a temporary folder marked
partial and renamed into place only when complete. Under torchrun every rank streams the
blocks (no replica of the model per rank) and rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..config import PruneConfig, check_config, make_config
from ..models import find_blocks
from ..streaming import Checkpoint, CheckpointWriter, check_output, open_checkpoint
from .arguments import PruneArgs
from .block_layers import count_block_zeros
from .blockstore import BlockStore
from .prune import run_stages
from .report import PruneReport
from .stream_quant import CompressedBlocks, check_quant_stream

REPORT_FILE = "fastprune_report.json"


def buffers_to(module: nn.Module, device, skip: str | None = None) -> None:
    """Move `module`'s buffers (those the checkpoint does not hold too: rotary frequencies)
    to `device`, except those of submodules under the name `skip`."""
    for name, m in module.named_modules():
        if skip is not None and (name == skip or name.startswith(skip + ".")):
            continue
        for k, b in m._buffers.items():
            if b is not None and b.device != torch.device(device):
                m._buffers[k] = b.to(device)


class BlocksOnDemand:
    """A streamed model's blocks loaded from the checkpoint when the whole model runs (the
    pre-flight's forward, the capture of per-block arguments): `load(i)` reads block `i`
    onto the device of the modules outside the blocks, `release(i)` frees it."""

    def __init__(self, store: StreamedBlocks, args: PruneArgs):
        from ..models import model_device

        self.store, self.blocks, self.path = store, args.block_list, args.blocks_path
        self.device = model_device(args.model)
        self.held: set[int] = set()

    def load(self, i: int) -> None:
        self.store.enter(i, self.blocks[i], f"{self.path}.{i}", self.device)
        self.held.add(i)

    def release(self, i: int) -> None:
        self.held.discard(i)
        self.store.ckpt.release(self.blocks[i])

    @contextlib.contextmanager
    def hooked(self):
        """Within: each block loaded when it is called and released when it returns (one
        block's weights at a time); any left loaded by an interrupted forward released."""

        def load(i):
            return lambda _mod, _args: None if i in self.held else self.load(i)

        handles = [b.register_forward_pre_hook(load(i)) for i, b in enumerate(self.blocks)]
        handles += [
            b.register_forward_hook(lambda _m, _a, _o, i=i: self.release(i))
            for i, b in enumerate(self.blocks)
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for i in sorted(self.held):
                self.release(i)


class StreamedBlocks(BlockStore):
    """Blocks read from `ckpt` when a stage needs them and, once pruned, written to the
    writer `open_writer()` makes once the pre-flight and capture are done (None on the ranks
    that do not write), then released back to the meta device."""

    streamed = True

    def __init__(
        self,
        ckpt: Checkpoint,
        open_writer,
        dtype: torch.dtype,
        compressed: CompressedBlocks | None = None,
    ):
        self.ckpt, self.open_writer, self.dtype = ckpt, open_writer, dtype
        self.writer: CheckpointWriter | None = None
        self.compressed = compressed  # a quantized prune: blocks written as compressed tensors
        self.report: PruneReport | None = None
        self.zeros = self.entries = 0
        self.bytes_read = 0

    def started(self, report: PruneReport) -> None:
        self.report = report

    def check(self, args: PruneArgs) -> None:
        if args.meth.needs_gradients:
            raise ValueError(
                f"method {args.method!r} needs gradients through the whole model, which a "
                "streamed prune never holds: prune it in memory"
            )
        if args.allocation != "uniform":
            raise ValueError(
                f"allocation={args.allocation!r} is not available when streaming (it scores "
                "every block before pruning any); use allocation='uniform' or prune in memory"
            )
        if len(set(args.kinds)) > 1:
            raise ValueError(
                "blocks of several kinds (config.layer_types) are not streamed yet: their "
                "arguments are captured by running the blocks before each kind's first"
            )

    def on_demand(self, args: PruneArgs) -> BlocksOnDemand:
        """The blocks loaded as the whole model's forward calls them (`BlocksOnDemand`)."""
        return BlocksOnDemand(self, args)

    def captured(self, args: PruneArgs) -> None:
        # nothing refused: the output opened, the embeddings, final norm and head written
        # out at once (the buffer never holds them beside a block) and freed for the blocks
        if self.open_writer is not None:
            self.writer = self.open_writer()
            for key, t in self.ckpt.module_tensors(args.model, "", skip=[args.blocks_path]):
                self.writer.add(key, t, copy=False)
            self.writer.flush()
        self.ckpt.release(args.model)

    def enter(self, i: int, block: nn.Module, prefix: str, device: torch.device) -> None:
        self.bytes_read += self.ckpt.load(block, prefix, device=device, dtype=self.dtype)
        buffers_to(block, device)  # as `block.to(device)` moves them in memory

    def leave(self, i: int, block: nn.Module, prefix: str) -> None:
        z, e = count_block_zeros([block])
        self.zeros += z
        self.entries += e
        quantized = {} if self.report is None else self.report.quantized
        if self.writer is not None:
            if self.compressed is not None:
                tensors = self.compressed.tensors(block, prefix, quantized)
            else:
                tensors = self.ckpt.module_tensors(block, prefix)
            for key, t in tensors:
                self.writer.add(key, t, copy=False)  # written before the block is freed
            self.writer.flush()  # one block in host memory at a time
        for name in [k for k in quantized if k.startswith(prefix + ".")]:
            del quantized[name]  # its codes are on disk (or the writer's rank's to write)
        self.ckpt.release(block)

    def block_zeros(self, blocks: nn.ModuleList) -> tuple[int, int]:
        return self.zeros, self.entries

    def identity(self) -> str:
        return self.ckpt.identity()


def prune_checkpoint(
    checkpoint: str | Path | Checkpoint,
    save: str | Path,
    calibration=None,
    config: PruneConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    tokenizer=None,
    max_shard_bytes: int = 5 * 2**30,
    **overrides,
) -> PruneReport:
    """Prune the local safetensors checkpoint `checkpoint` block by block into the folder
    `save` (which must not exist or be empty, and not lie inside the source), holding one
    decoder block (two in the pre-flight's forward) and the calibration activations in
    memory at a time; a refusal (of the options, or by the pre-flight) leaves `save` unmade.
    `config` and `overrides`: as for `prune_model` (method, sparsity, prune_n, prune_m,
    device, nsamples, seqlen, ..., method options); gradient methods (GBLM) and OWL
    allocation need the whole model and are refused. `dtype`: the dtype blocks are pruned in
    and written (default: the checkpoint's). `tokenizer` is saved beside the weights. The
    report says `path="streamed"`, the peak host memory and the bytes read; `save` gets
    `fastprune_report.json` too. A quantized prune (`quant`) writes the compressed-tensors
    checkpoint the in-memory save writes (`save_pruned`), block by block; its report keeps
    no codes (`report.quantized` is empty: they are on disk)."""
    config = make_config(config, (), overrides, "prune_checkpoint")
    spec = check_config(config).quant
    if config.device is None:
        config = dataclasses.replace(config, device="cpu")  # the skeleton has no device
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    out = check_output(save, ckpt.path)
    model = ckpt.skeleton(dtype)
    dtype = next(model.parameters()).dtype
    blocks_path, blocks = find_blocks(model, config.blocks)
    compressed = None
    if spec is not None:  # refused before anything is written
        check_quant_stream(model, blocks_path, blocks, config, spec, ckpt)
        compressed = CompressedBlocks(ckpt, dtype)
    ckpt.load(model, "", device="cpu", skip=[blocks_path])  # embeddings, final norm, head
    from .distributed import active_world

    lead = active_world() == 1 or torch.distributed.get_rank() == 0
    opener = (lambda: CheckpointWriter(out, max_shard_bytes, ckpt.path)) if lead else None
    store = StreamedBlocks(ckpt, opener, dtype, compressed)
    try:
        report = run_stages(model, calibration, config, store, tokenizer)
        writer = store.writer
        report.totals.update(bytes_read=store.bytes_read, checkpoint=str(ckpt.path))
        entries = None
        if compressed is not None:
            entries = compressed.config(model, report)
            fmt = entries["quantization_config"]["format"]
            layers = report.totals.get("quant", {}).get("layers", 0)
            report.totals["compressed"] = {"format": fmt, "layers": layers}
        if writer is not None:
            writer.finish(
                model.config,
                tokenizer=tokenizer,
                generation_config=getattr(model, "generation_config", None),
                extra_files={REPORT_FILE: json.dumps(report.to_dict(), indent=1)},
                config_entries=entries,
            )
            report.totals["saved"] = str(out)
            report.totals["digests"] = writer.digests
    except BaseException as e:
        if store.writer is not None:  # None: refused before the output was opened
            store.writer.__exit__(type(e), e, None)  # the partial folder says why
        raise
    return report


@torch.no_grad()
def verify_streamed_prune(out_dir: str | Path, report: PruneReport) -> dict:
    """Check a streamed prune's output without loading it whole: every tensor read back
    equal to what was written (digests), every pruned layer's zeros and N:M pattern, the
    blocks' zeros equal to the report's, one block in memory at a time."""
    from ..streaming import verify_streamed
    from .verify import check_layer_sparsity, report_pattern

    out = verify_streamed(out_dir, report.totals.get("digests"))
    ckpt = open_checkpoint(out_dir)
    path, blocks = find_blocks(ckpt.skeleton(), report.totals.get("blocks_path"))
    n, m = report_pattern(report)
    zeros = entries = pruned_zeros = pruned = 0
    for i, block in enumerate(blocks):
        ckpt.load(block, f"{path}.{i}")
        for lr in report.layers:
            if lr.block == i:
                z, size = check_layer_sparsity(block, lr, path, n, m)
                pruned_zeros, pruned = pruned_zeros + z, pruned + size
        z, e = count_block_zeros([block])
        zeros, entries = zeros + z, entries + e
        ckpt.release(block)
    if "block_zeros" in report.totals and zeros != report.totals["block_zeros"]:
        left = report.totals["block_zeros"]
        raise ValueError(f"the saved blocks hold {zeros:,} zeros; the prune left {left:,}")
    out.update(sparsity=pruned_zeros / max(1, pruned), block_sparsity=zeros / max(1, entries))
    return out


class _Replay(nn.Module):
    """Stands in for a decoder block during the final pass of a streamed evaluation: the last
    one returns the stored output of the real last block for the current window, the others
    hand their input on; `tuple_output` mimics blocks that return tuples."""

    def __init__(self, outputs: torch.Tensor | None, state: dict, tuple_output: bool):
        super().__init__()
        self.outputs, self.state, self.tuple_output = outputs, state, tuple_output

    def forward(self, hidden_states, *args, **kwargs):
        if self.outputs is not None:
            s = self.state["window"]
            hidden_states = self.outputs[s : s + hidden_states.shape[0]].to(hidden_states.device)
        return (hidden_states,) if self.tuple_output else hidden_states


@torch.no_grad()
def streamed_perplexity(
    checkpoint: str | Path | Checkpoint,
    ids: torch.Tensor,
    seqlen: int,
    *,
    max_windows: int | None = None,
    device="cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "perplexity",
) -> dict:
    """`fastprune.perplexity` of the model in `checkpoint` without loading it whole: the
    windows' first-block inputs are captured, every block is loaded, run over all windows
    and released in turn, and the model's own head then runs on the last block's outputs
    (the blocks replaced by stand-ins that hand those outputs on). Same windows, same
    result as the in-memory evaluation up to the rounding of batched block forwards."""
    from tqdm.auto import tqdm

    from ..evaluate import eval_windows, perplexity_result, window_nll
    from .capture import block_kinds, capture_inputs, run_block, to_device

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    windows = eval_windows(ids, seqlen, max_windows)
    model = ckpt.skeleton(dtype)
    path, blocks = find_blocks(model)
    kinds = block_kinds(model, len(blocks))
    if len(set(kinds)) > 1:
        raise ValueError("blocks of several kinds (config.layer_types) are not streamed yet")
    dev = torch.device(device)
    ckpt.load(model, "", device=dev, skip=[path])  # embeddings, final norm, head on `device`
    buffers_to(model, dev, skip=path)
    acts = capture_inputs(model, blocks, kinds, windows, 1, dev, None)
    arg_sets = [(to_device(a, dev), to_device(k, dev)) for a, k in acts.arg_sets]
    tuple_output = False
    for i in tqdm(range(len(blocks)), desc=f"{desc} (streamed)", disable=not progress):
        block = blocks[i]
        ckpt.load(block, f"{path}.{i}", device=dev)
        buffers_to(block, dev)
        if i == len(blocks) - 1:  # how the model's loop expects a block's output
            args, kwargs = arg_sets[acts.batch_args[kinds[i]][0]]
            out = block(acts.inps[:1].to(dev), *args, **kwargs)
            tuple_output = isinstance(out, tuple | list)
        run_block(block, acts, 1, dev, arg_sets, kinds[i])
        acts.swap()
        ckpt.release(block)
    state = {"window": 0}
    originals = list(blocks)
    for j in range(len(blocks)):
        last = j == len(blocks) - 1
        blocks[j] = _Replay(acts.inps if last else None, state, tuple_output)
    total, count = 0.0, 0
    try:
        for s in range(windows.shape[0]):
            state["window"] = s
            x = windows[s : s + 1].to(dev)
            nll, n = window_nll(model(input_ids=x, use_cache=False).logits, x)
            total += nll
            count += n
    finally:
        for j, b in enumerate(originals):
            blocks[j] = b
    return perplexity_result(total, count, windows.shape[0], seqlen)
