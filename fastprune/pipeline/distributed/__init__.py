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
   merged (`merge_part_reports`: losses summed). A quantized layer (`quant`) is solved
   whole (its grids and grid error are the layer's) and its codes and grids are broadcast
   too (`Comm.share_quantized`), so every rank's report holds every layer's;
4. every rank propagates its shard through the pruned block.

Faults: every local phase (setup, capture, gradients, a block's forward, solves,
propagation) runs under `Comm.guard`: an exception there is not raised at once but
exchanged at the end of the phase, so every rank stops together, the failing rank with its
own exception and the others with `RankFailedError` naming it; a rank that dies outright
(or hangs) makes the others' next collective fail, at the latest after the process group's
timeout (`init_from_env`: `FASTPRUNE_DIST_TIMEOUT` seconds, or `--dist-timeout`).

With a process group of size 1, or none, `prune_model` runs its single-process path.
"""

from .comm import Comm
from .fingerprint import disagreement, fingerprint, weights_checksum
from .group import (
    BACKEND_ENV,
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    RankFailedError,
    RankLostError,
    active_world,
    choose_backend,
    dist_timeout,
    init_from_env,
)
from .plan import (
    ROW_SPLIT_ENV,
    ROW_SPLITS,
    SPLIT_SLACK,
    Part,
    assign_owners,
    merge_part_reports,
    plan_block,
    row_split_mode,
    solve_cost,
)

__all__ = [
    "BACKEND_ENV",
    "DEFAULT_TIMEOUT_S",
    "ROW_SPLITS",
    "ROW_SPLIT_ENV",
    "SPLIT_SLACK",
    "TIMEOUT_ENV",
    "Comm",
    "Part",
    "RankFailedError",
    "RankLostError",
    "active_world",
    "assign_owners",
    "choose_backend",
    "disagreement",
    "dist_timeout",
    "fingerprint",
    "init_from_env",
    "merge_part_reports",
    "plan_block",
    "row_split_mode",
    "solve_cost",
    "weights_checksum",
]
