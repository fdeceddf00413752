"""fastprune's Triton kernels, one op per module (installed as `fastprune.triton_kernels`;
kernels import nothing of fastprune). `radix_select.py` holds the exact order statistic that
`block_prune_mask` and `column_losses` share.

`OPS = {op: (launcher, unsupported)}`: each launcher has the contract of
`fastprune.ops.<op>`, and `unsupported(*args)` says why it cannot take given inputs (None if
it can). `BATCHED`: the ops whose launcher also takes the op's batched form; `QUANT`: those
that also take the op's `quant=` option. Importing this
package imports triton (an ImportError means "no Triton backend").
"""

from __future__ import annotations

from . import block_prune_mask, column_losses, obs_sweep, swap_apply, swap_search

OPS: dict = {}
BATCHED: frozenset = frozenset()
QUANT: frozenset = frozenset()
for _mod in (obs_sweep, block_prune_mask, column_losses, swap_search, swap_apply):
    OPS.update(_mod.OPS)
    BATCHED |= getattr(_mod, "BATCHED", frozenset())
    QUANT |= getattr(_mod, "QUANT", frozenset())
