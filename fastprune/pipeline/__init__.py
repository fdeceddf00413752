"""Model-level one-shot pruning: sequential, block by block, the way SparseGPT and Wanda do it.

1. The inputs of the first decoder block are captured with a forward pre-hook that raises a
   sentinel (so nothing past the embeddings runs), together with the positional and keyword
   arguments the model itself passed (attention mask, position embeddings, ...). Every block
   is replayed with those arguments, which keeps the pipeline independent of how a given
   transformers version wires its decoder loop. Models whose blocks come in kinds that get
   different arguments (`config.layer_types`: Gemma-2/3's sliding vs full attention) have
   the arguments of each kind's first block captured too, and each block is replayed with
   its own kind's. (`capture`)
2. For each block (moved alone to `device`): one forward pass over the calibration
   activations with pre-hooks on its linear layers accumulates one float32 `H` per distinct
   input (layers fed the very same tensor, q/k/v or gate/up, share one `H` and, for methods
   that share inverses (SparseGPT), one inverse) (`hessian_hooks`); each linear is pruned by
   its method's entry in `fastprune.METHODS`; the block is run again so the next block sees
   the pruned block's outputs; the block goes back where it was. (`prune`, `stages`)
3. Methods that need gradients (GBLM) first run real backward passes over the calibration
   samples (one sample at a time, whole model on `device`) and accumulate the per-weight
   l1/l2 gradient norm in a float32 buffer per pruned weight, from a hook that frees each
   gradient as soon as it is added. (`gradients`)

Memory for calibration activations: two `[nsamples, seqlen, hidden]` buffers in the model's
dtype (inputs and outputs of the current block), on `device` when they fit comfortably
(CUDA: under a quarter of the free memory) else on CPU; the report states the bytes.
`report` has `PruneReport` / `LayerReport`; `verify` measures a pruned model's sparsity.
`stream` prunes a checkpoint bigger than host memory one block at a time (`prune_checkpoint`).
"""

from ..methods import METHODS, auto_max_swaps
from .capture import block_kinds
from .gradients import compute_gradient_norms
from .prune import prune_model
from .report import LayerReport, PruneReport
from .stream import prune_checkpoint, streamed_perplexity
from .verify import check_model_sparsity

__all__ = [
    "METHODS",
    "LayerReport",
    "PruneReport",
    "auto_max_swaps",
    "block_kinds",
    "check_model_sparsity",
    "compute_gradient_norms",
    "prune_checkpoint",
    "prune_model",
    "streamed_perplexity",
]
