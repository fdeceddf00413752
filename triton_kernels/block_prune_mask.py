"""Triton `block_prune_mask` (contract: `fastprune.ops.block_prune_mask`).

The block's threshold is the exact `int(numel * sparsity)`-th smallest `w^2 / d^2` (radix
selection, `radix_select.py`, the score formed on the fly); then `_keep_kernel`, grid
`(row tiles, column tiles)` of `[BLOCK_R, BLOCK_C]`, writes `score > thr` as bytes. Scores
are selected in float32 (fp16/bf16 inputs are upcast exactly).

The dispatcher passes this kernel over for CUDA tensors (`triton_block_prune_mask_unsupported`:
torch's sort selects faster there), so solves run it only on CPU tensors under the Triton
interpreter; `triton_block_prune_mask` itself takes CUDA tensors when called directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .radix_select import kth_smallest_blocks


@triton.jit
def _keep_kernel(
    W_ptr,
    D_ptr,
    thr_ptr,
    K_ptr,
    rows,
    cols,
    stride_wm,
    stride_wn,
    stride_d,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (r < rows)[:, None] & (c < cols)[None, :]
    w = tl.load(W_ptr + r[:, None] * stride_wm + c[None, :] * stride_wn, mask=ok, other=0.0)
    w = w.to(tl.float32)
    d = tl.load(D_ptr + c * stride_d, mask=c < cols, other=1.0).to(tl.float32)
    thr = tl.load(thr_ptr)
    score = tl.math.div_rn(w * w, (d * d)[None, :])
    tl.store(K_ptr + r[:, None] * cols + c[None, :], (score > thr).to(tl.int8), mask=ok)


# ----------------------------------------------------------------------------- launcher


SORT_IS_FASTER_ON_GPU = (
    "on a GPU torch's sort selects faster than this radix selection "
    "(benchmarks/results/h100/), so solves take torch's; call triton_block_prune_mask to run it"
)


def triton_block_prune_mask_unsupported(W1, hinv_diag, sparsity):
    if torch.float64 in (W1.dtype, hinv_diag.dtype):
        return "the radix selection is float32-only, got float64"
    if W1.device.type == "cuda":
        return SORT_IS_FASTER_ON_GPU
    return None


def triton_block_prune_mask(W1: torch.Tensor, hinv_diag: torch.Tensor, sparsity: float):
    """Keep-mask of one block: keep `w^2/d^2 > sorted[int(numel*s)]` (exact k-th by radix
    selection, then one pass writing the mask)."""
    rows, cols = W1.shape
    out = torch.empty(rows, cols, dtype=torch.int8, device=W1.device)
    if W1.numel() == 0:
        return out.view(torch.bool)
    thr = kth_smallest_blocks(W1, [(0, cols)], sparsity, d=hinv_diag)
    block_c = min(128, max(16, triton.next_power_of_2(cols)))
    block_r = max(1, min(triton.next_power_of_2(rows), 4096 // block_c))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _keep_kernel[grid](
        W1,
        hinv_diag,
        thr,
        out,
        rows,
        cols,
        W1.stride(0),
        W1.stride(1),
        hinv_diag.stride(0),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out.view(torch.bool)


OPS = {"block_prune_mask": (triton_block_prune_mask, triton_block_prune_mask_unsupported)}
