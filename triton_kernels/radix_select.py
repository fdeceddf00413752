"""Exact per-block order statistics by radix *selection* (never a sort), shared by the
`column_losses` and `block_prune_mask` kernels.

Float32 scores are mapped to order-preserving 32-bit keys (positive floats get the sign bit
set, negative ones are bit-inverted) and the k-th key of every block of columns is found digit
by digit, 11 + 11 + 10 bits, in three passes of two kernels:
  * `_radix_hist_kernel`, grid `(blocks, row splits, column tiles)`: each program loops over
    its rows, histograms (2048 bins) the current digit of the keys whose higher bits match
    the prefix found so far, and adds its non-zero bins atomically to the block's histogram;
  * `_radix_pick_kernel`, grid `(blocks,)`: cumulative sum of the block's histogram, picks
    the bin holding the remaining rank, extends the prefix, clears the histogram.
Three reads of the scores for the exact order statistic, all blocks at once, no host
synchronisation, integer counts (exact and deterministic). Chosen over `torch.kthvalue` (one
CTA per slice, 2 bits per pass) and over a sort. The score may be formed on the fly as
`x^2 / d^2` (SparseGPT's `w^2 / Hinv_jj^2`).
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


def row_splits(rows: int, block_r: int, other_programs: int) -> tuple[int, int]:
    """(number of row splits, rows per split) so that the grid has ~_TARGET_PROGRAMS."""
    n = max(1, min(triton.cdiv(rows, block_r), _TARGET_PROGRAMS // max(1, other_programs)))
    per = triton.cdiv(triton.cdiv(rows, n), block_r) * block_r
    return triton.cdiv(rows, per), per


_GEOMETRY: dict = {}  # (device, bounds, cols) -> device tensors; built once, no H2D per call


def block_geometry(bounds, cols: int, device):
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
    starts, ends, width_t, _ = block_geometry(bounds, cols, dev)
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
    nsplit, per = row_splits(rows, block_r, nb * ctiles)
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
