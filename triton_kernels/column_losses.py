"""ROSE's pre-pruning losses and SparseGPT's unstructured block mask, with a per-block
radix *selection* (never a sort) done in Triton.

Unstructured (`prune_n == 0`): for each block `b` of columns `[i1, i2)` the threshold is the
`k_b = int(numel_b * sparsity)`-th smallest score of the block (0-based, i.e. the reference's
`sorted(S_block)[k_b]`), entries `S <= thr_b` are pre-pruned, `L = S` there and 0 elsewhere;
column loss = column sums of `L`, block loss = block sums. N:M: the `prune_n` lowest of every
group of `prune_m` columns (a lower column index wins an exact tie), block = group.

Selection: float32 scores are mapped to order-preserving 32-bit keys (positive floats get
the sign bit set, negative ones are bit-inverted) and the k-th key of every block is found
digit by digit, 11 + 11 + 10 bits, in three passes:
  * `_radix_hist_kernel`, grid `(blocks, row splits, column tiles)`: each program loops over
    its rows, histograms (2048 bins) the current digit of the keys whose higher bits match
    the prefix found so far, and adds its non-zero bins atomically to the block's histogram;
  * `_radix_pick_kernel`, grid `(blocks,)`: cumulative sum of the block's histogram, picks
    the bin holding the remaining rank, extends the prefix, clears the histogram.
That is three reads of the scores for the exact order statistic, all blocks at once and no
host synchronisation (integer counts, so the selection is exact and deterministic). We chose
this over `torch.kthvalue` (one CTA per slice, 2 bits per pass) and over a sort.
Then one more pass forms the losses: `_masked_colsum_kernel`, grid `(column tiles, row
splits)`, writes per-split column sums (summed by torch, deterministic, no float atomics);
`_segment_sum_kernel` adds them up per block. The N:M path needs no selection: one pass of
`_nm_colsum_kernel` ranks each entry within its group in registers.

For SparseGPT's block mask the score `w^2 / Hinv_jj^2` is formed on the fly from `W1` and
the diagonal, and `_score_le_kernel` writes the mask.

Scores are selected in float32 (fp16/bf16 inputs are upcast exactly). float64 inputs take
the torch reference path (a 64-bit key would need six passes; only float64 layers on CPU
use it). Outputs are float32 (float64 for the float64 fallback).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NBINS = 2048  # 11-bit digits
# (shift of the digit, mask of the higher bits already fixed) for the three passes
_PASSES = ((21, 0), (10, -(1 << 21)), (0, -(1 << 10)))
_TARGET_PROGRAMS = 1024  # enough CTAs to fill a large GPU; programs loop over rows


@triton.jit
def _sortable_key(x):
    """Order-preserving int32 key of float32 `x` (compare as unsigned 32-bit)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) | -2147483648)


@triton.jit
def _radix_hist_kernel(
    X_ptr,
    D_ptr,
    start_ptr,
    end_ptr,
    prefix_ptr,
    hist_ptr,
    rows,
    rows_per_split,
    stride_xm,
    stride_xn,
    stride_d,
    SHIFT: tl.constexpr,
    HIGH_MASK: tl.constexpr,
    HAS_D: tl.constexpr,
    NBINS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    c0 = tl.load(start_ptr + b) + tl.program_id(2) * BLOCK_C
    c1 = tl.load(end_ptr + b)
    if c0 < c1:
        prefix = tl.load(prefix_ptr + b)
        idx = tl.arange(0, BLOCK_R * BLOCK_C)
        c = c0 + idx % BLOCK_C
        cok = c < c1
        if HAS_D:
            dd = tl.load(D_ptr + c * stride_d, mask=cok, other=1.0).to(tl.float32)
        r_lo = split * rows_per_split
        r_hi = tl.minimum(r_lo + rows_per_split, rows)
        hist = tl.zeros([NBINS], dtype=tl.int32)
        n_out = tl.zeros([BLOCK_R * BLOCK_C], dtype=tl.int32)
        for r0 in range(r_lo, r_hi, BLOCK_R):
            r = r0 + idx // BLOCK_C
            ok = (r < r_hi) & cok
            x = tl.load(X_ptr + r * stride_xm + c * stride_xn, mask=ok, other=0.0)
            x = x.to(tl.float32)
            if HAS_D:
                x = tl.math.div_rn(x * x, dd * dd)
            key = _sortable_key(x)
            ok = ok & ((key & HIGH_MASK) == prefix)
            digit = tl.where(ok, (key >> SHIFT) & (NBINS - 1), 0)
            hist += tl.histogram(digit, NBINS)
            n_out += (~ok).to(tl.int32)
        bins = tl.arange(0, NBINS)
        # excluded entries were counted in bin 0 (digit 0); take them out
        hist -= tl.where(bins == 0, tl.sum(n_out, axis=0), 0)
        tl.atomic_add(hist_ptr + b * NBINS + bins, hist, mask=hist > 0)


@triton.jit
def _radix_pick_kernel(hist_ptr, prefix_ptr, krem_ptr, SHIFT: tl.constexpr, NBINS: tl.constexpr):
    b = tl.program_id(0)
    bins = tl.arange(0, NBINS)
    h = tl.load(hist_ptr + b * NBINS + bins)
    krem = tl.load(krem_ptr + b)
    cum = tl.cumsum(h, axis=0)
    digit = tl.sum((cum <= krem).to(tl.int32), axis=0)  # bin holding the krem-th entry
    below = tl.sum(tl.where(bins < digit, h, 0), axis=0)
    tl.store(krem_ptr + b, krem - below)
    tl.store(prefix_ptr + b, tl.load(prefix_ptr + b) | (digit << SHIFT))
    tl.store(hist_ptr + b * NBINS + bins, tl.zeros([NBINS], dtype=tl.int32))


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


@triton.jit
def _score_le_kernel(
    W_ptr,
    D_ptr,
    thr_ptr,
    P_ptr,
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
    tl.store(P_ptr + r[:, None] * cols + c[None, :], (score <= thr).to(tl.int8), mask=ok)


# ----------------------------------------------------------------------------- launchers


def _splits(rows: int, block_r: int, other_programs: int) -> tuple[int, int]:
    """(number of row splits, rows per split) so that the grid has ~_TARGET_PROGRAMS."""
    n = max(1, min(triton.cdiv(rows, block_r), _TARGET_PROGRAMS // max(1, other_programs)))
    per = triton.cdiv(triton.cdiv(rows, n), block_r) * block_r
    return triton.cdiv(rows, per), per


_GEOMETRY: dict = {}  # (device, bounds, cols) -> device tensors; built once, no H2D per call


def _geometry(bounds, cols: int, device):
    """`(starts, ends, numel_per_row, colblock)` int32/float64 device tensors for `bounds`.

    Cached, so the per-block calls of the SparseGPT loop never copy from the host (a
    pageable host-to-device copy would synchronise with the stream)."""
    key = (str(device), tuple((int(a), int(b)) for a, b in bounds), int(cols))
    geo = _GEOMETRY.get(key)
    if geo is None:
        if len(_GEOMETRY) > 256:
            _GEOMETRY.clear()
        starts = torch.tensor([b[0] for b in key[1]], dtype=torch.int32)
        ends = torch.tensor([b[1] for b in key[1]], dtype=torch.int32)
        colblock = torch.full((cols,), -1, dtype=torch.int32)
        for b, (i1, i2) in enumerate(key[1]):
            colblock[i1:i2] = b
        geo = tuple(t.to(device) for t in (starts, ends, (ends - starts).double(), colblock))
        _GEOMETRY[key] = geo
    return geo


def kth_smallest_blocks(
    X: torch.Tensor, bounds, sparsity: float | None = None, ks=None, d: torch.Tensor | None = None
):
    """Per block `[i1, i2)` of columns, the `k_b`-th smallest (0-based) value of
    `X[:, i1:i2]` (of `X^2 / d^2` when `d` is given), as a float32 device tensor
    `[len(bounds)]`; exact. `k_b = int(numel_b * sparsity)` (computed on the device in
    float64 exactly as Python does), or the explicit list `ks`."""
    rows, cols = X.shape
    dev = X.device
    nb = len(bounds)
    starts, ends, width_t, _ = _geometry(bounds, cols, dev)
    if ks is not None:
        krem = torch.tensor(list(ks), dtype=torch.int32).to(dev)
    else:
        krem = torch.floor(width_t * rows * sparsity).to(torch.int32)
    prefix = torch.zeros(nb, dtype=torch.int32, device=dev)
    hist = torch.zeros(nb, NBINS, dtype=torch.int32, device=dev)
    width = max(i2 - i1 for i1, i2 in bounds)
    block_c = min(128, max(16, triton.next_power_of_2(width)))
    block_r = max(1, 4096 // block_c)
    ctiles = triton.cdiv(width, block_c)
    nsplit, per = _splits(rows, block_r, nb * ctiles)
    dd = d if d is not None else X  # dummy pointer when HAS_D is False
    for shift, high in _PASSES:
        _radix_hist_kernel[(nb, nsplit, ctiles)](
            X,
            dd,
            starts,
            ends,
            prefix,
            hist,
            rows,
            per,
            X.stride(0),
            X.stride(1),
            dd.stride(0) if d is not None else 0,
            SHIFT=shift,
            HIGH_MASK=high,
            HAS_D=d is not None,
            NBINS=NBINS,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=4,
        )
        _radix_pick_kernel[(nb,)](hist, prefix, krem, SHIFT=shift, NBINS=NBINS, num_warps=4)
    # invert the key map: sign bit set -> positive float (clear it), else bit-inverted
    bits = torch.where(prefix < 0, prefix ^ torch.iinfo(torch.int32).min, ~prefix)
    return bits.view(torch.float32)


def triton_block_prune_mask(W1: torch.Tensor, hinv_diag: torch.Tensor, sparsity: float):
    """Triton version of `torch_block_prune_mask`: prune `w^2/d^2 <= sorted[int(numel*s)]`
    over the whole block (True = pruned)."""
    if W1.dtype == torch.float64 or hinv_diag.dtype == torch.float64:
        return (W1**2 / hinv_diag.reshape(1, -1) ** 2) <= _torch_kth(
            W1**2 / hinv_diag.reshape(1, -1) ** 2, sparsity
        )
    rows, cols = W1.shape
    out = torch.empty(rows, cols, dtype=torch.int8, device=W1.device)
    if W1.numel() == 0:
        return out.view(torch.bool)
    thr = kth_smallest_blocks(W1, [(0, cols)], sparsity, d=hinv_diag)
    block_c = min(128, max(16, triton.next_power_of_2(cols)))
    block_r = max(1, min(triton.next_power_of_2(rows), 4096 // block_c))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _score_le_kernel[grid](
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


def _torch_kth(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = score.flatten()
    return torch.kthvalue(flat, int(flat.numel() * sparsity) + 1).values


def triton_column_losses(
    S: torch.Tensor, bounds, sparsity: float, prune_n: int = 0, prune_m: int = 0
):
    """Triton version of `torch_column_losses`: `(column_loss [cols], block_loss [nblocks])`.

    `bounds` are disjoint `(i1, i2)` column ranges (columns outside every block get loss 0);
    with `prune_n > 0` the blocks are the groups of `prune_m` columns (bounds unused).
    """
    if S.dim() != 2:
        raise ValueError(f"S must be [rows, cols], got {tuple(S.shape)}")
    if S.dtype == torch.float64:
        return _torch_column_losses_f64(S, bounds, sparsity, prune_n, prune_m)
    rows, cols = S.shape
    dev = S.device
    if prune_n:
        if prune_m <= 0 or prune_n > prune_m or cols % prune_m:
            raise ValueError(f"bad N:M pattern {prune_n}:{prune_m} for {cols} columns")
        m_p = triton.next_power_of_2(prune_m)
        groups = max(1, 64 // m_p)
        block_r = max(1, min(triton.next_power_of_2(rows), 2048 // (groups * m_p)))
        gtiles = triton.cdiv(cols // prune_m, groups)
        nsplit, per = _splits(rows, block_r, gtiles)
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
    starts, ends, _, colblock = _geometry(bounds, cols, dev)
    block_c = 32
    block_r = 64
    ctiles = triton.cdiv(cols, block_c)
    nsplit, per = _splits(rows, block_r, ctiles)
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


def _torch_column_losses_f64(S, bounds, sparsity, prune_n, prune_m):
    """float64 scores: the reference computation (kthvalue selection), on any device."""
    rows, cols = S.shape
    if prune_n:
        g = S.reshape(rows, cols // prune_m, prune_m)
        idx = torch.topk(g, prune_n, dim=-1, largest=False).indices
        low = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
        col = (S * low.reshape(rows, cols)).sum(0)
        return col, col.reshape(-1, prune_m).sum(1)
    col = torch.zeros(cols, dtype=S.dtype, device=S.device)
    blocks = torch.zeros(len(bounds), dtype=S.dtype, device=S.device)
    for b, (i1, i2) in enumerate(bounds):
        Sb = S[:, i1:i2]
        Lb = Sb * (Sb <= _torch_kth(Sb, sparsity))
        col[i1:i2] = Lb.sum(0)
        blocks[b] = Lb.sum()
    return col, blocks


OPS = {"column_losses": triton_column_losses, "block_prune_mask": triton_block_prune_mask}
