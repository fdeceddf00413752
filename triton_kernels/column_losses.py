"""Triton `column_losses` (contract: `fastprune.ops.column_losses`): ROSE's pre-pruning
losses without a sort.

Unstructured: per block the threshold is the exact `int(numel * sparsity)`-th smallest score
(radix selection, `radix_select.py`); then `_masked_colsum_kernel`, grid `(column tiles, row
splits)`, writes per-split column sums of the scores at or below their block's threshold
(summed by torch: deterministic, no float atomics) and `_segment_sum_kernel`, grid
`(blocks,)`, adds columns up per block. N:M needs no selection: `_nm_colsum_kernel`, grid
`(group tiles, row splits)`, ranks each entry within its group in registers. Scores are
float32 (fp16/bf16 upcast exactly); float64 is left to the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .radix_select import block_geometry, kth_smallest_blocks, row_splits


@triton.jit
def _masked_colsum_kernel(
    S_ptr,
    colblock_ptr,
    thr_ptr,
    part_ptr,
    rows,
    cols,
    rows_per_split,
    stride_sm,
    stride_sn,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    cok = c < cols
    blk = tl.load(colblock_ptr + c, mask=cok, other=-1)
    covered = blk >= 0
    thr = tl.load(thr_ptr + blk, mask=covered, other=0.0)
    r_lo = split * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, rows)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = (r < r_hi)[:, None] & (cok & covered)[None, :]
        s = tl.load(S_ptr + r[:, None] * stride_sm + c[None, :] * stride_sn, mask=ok, other=0.0)
        s = s.to(tl.float32)
        acc += tl.where(ok & (s <= thr[None, :]), s, 0.0)
    tl.store(part_ptr + split * cols + c, tl.sum(acc, axis=0), mask=cok)


@triton.jit
def _segment_sum_kernel(x_ptr, start_ptr, end_ptr, out_ptr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    c0 = tl.load(start_ptr + b)
    c1 = tl.load(end_ptr + b)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(c0, c1, BLOCK):
        c = j + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + c, mask=c < c1, other=0.0)
    tl.store(out_ptr + b, tl.sum(acc, axis=0))


@triton.jit
def _nm_colsum_kernel(
    S_ptr,
    part_ptr,
    rows,
    cols,
    rows_per_split,
    stride_sm,
    stride_sn,
    PRUNE_N: tl.constexpr,
    PRUNE_M: tl.constexpr,
    M_P: tl.constexpr,
    GROUPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    g = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    split = tl.program_id(1)
    mi = tl.arange(0, M_P)
    gcol = g * PRUNE_M  # first column of each group
    c = gcol[:, None] + mi[None, :]  # [GROUPS, M_P]
    cok = (gcol < cols)[:, None] & (mi < PRUNE_M)[None, :]
    r_lo = split * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, rows)
    acc = tl.zeros([BLOCK_R, GROUPS, M_P], dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rok = r < r_hi
        ok = rok[:, None, None] & cok[None, :, :]
        base = S_ptr + r[:, None, None] * stride_sm
        s = tl.load(base + c[None, :, :] * stride_sn, mask=ok, other=float("inf"))
        s = s.to(tl.float32)
        rank = tl.zeros([BLOCK_R, GROUPS, M_P], dtype=tl.int32)
        gok = rok[:, None] & (gcol < cols)[None, :]
        for k in tl.static_range(PRUNE_M):
            sk = tl.load(
                S_ptr + r[:, None] * stride_sm + (gcol + k)[None, :] * stride_sn,
                mask=gok,
                other=float("inf"),
            ).to(tl.float32)[:, :, None]
            before = (sk < s) | ((sk == s) & (k < mi)[None, None, :])
            rank += before.to(tl.int32)
        acc += tl.where(ok & (rank < PRUNE_N), s, 0.0)
    colsum = tl.sum(acc, axis=0)
    tl.store(part_ptr + split * cols + c, colsum, mask=cok)


# ----------------------------------------------------------------------------- launcher


def triton_column_losses_unsupported(S, bounds, sparsity, prune_n=0, prune_m=0):
    if S.dtype == torch.float64:
        return "the radix selection is float32-only, got float64"
    return None


def triton_column_losses(
    S: torch.Tensor, bounds, sparsity: float, prune_n: int = 0, prune_m: int = 0
):
    """`(column_loss [cols], block_loss [nblocks])` as float32 device tensors."""
    if S.dim() != 2:
        raise ValueError(f"S must be [rows, cols], got {tuple(S.shape)}")
    rows, cols = S.shape
    dev = S.device
    if prune_n:
        if prune_m <= 0 or prune_n > prune_m or cols % prune_m:
            raise ValueError(f"bad N:M pattern {prune_n}:{prune_m} for {cols} columns")
        m_p = triton.next_power_of_2(prune_m)
        groups = max(1, 64 // m_p)
        block_r = max(1, min(triton.next_power_of_2(rows), 2048 // (groups * m_p)))
        gtiles = triton.cdiv(cols // prune_m, groups)
        nsplit, per = row_splits(rows, block_r, gtiles)
        part = torch.empty(nsplit, cols, dtype=torch.float32, device=dev)
        _nm_colsum_kernel[(gtiles, nsplit)](
            S,
            part,
            rows,
            cols,
            per,
            S.stride(0),
            S.stride(1),
            PRUNE_N=prune_n,
            PRUNE_M=prune_m,
            M_P=m_p,
            GROUPS=groups,
            BLOCK_R=block_r,
            num_warps=4,
        )
        col = part.sum(0)
        return col, col.reshape(-1, prune_m).sum(1)

    nb = len(bounds)
    col = torch.zeros(cols, dtype=torch.float32, device=dev)
    blocks = torch.zeros(nb, dtype=torch.float32, device=dev)
    if nb == 0 or rows == 0:
        return col, blocks
    thr = kth_smallest_blocks(S, bounds, sparsity)
    starts, ends, _, colblock = block_geometry(bounds, cols, dev)
    block_c = 32
    block_r = 64
    ctiles = triton.cdiv(cols, block_c)
    nsplit, per = row_splits(rows, block_r, ctiles)
    part = torch.empty(nsplit, cols, dtype=torch.float32, device=dev)
    _masked_colsum_kernel[(ctiles, nsplit)](
        S,
        colblock,
        thr,
        part,
        rows,
        cols,
        per,
        S.stride(0),
        S.stride(1),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=4,
    )
    col = part.sum(0)
    _segment_sum_kernel[(nb,)](col, starts, ends, blocks, BLOCK=128, num_warps=4)
    return col, blocks


OPS = {"column_losses": (triton_column_losses, triton_column_losses_unsupported)}
