"""Triton `swap_search` (contract: `fastprune.ops.swap_search`): batched best-1-swap search
over a shared Gram matrix.

For a row `w` with keep-mask `k`, pruned residual `r = w * ~k` and `c = H r`, pruning a kept
`u` and un-pruning a pruned `p` changes the loss `r^T H r` by

    Δ(u, p) = w_u^2 H_uu + w_p^2 H_pp - 2 w_u w_p H_up + 2 w_u c_u - 2 w_p c_p
            = a_u + b_p + x_u * H_up * y_p

with per-row terms `a_u = w_u^2 H_uu + 2 w_u c_u`, `x_u = -2 w_u` (kept u; `a_u = inf`,
`x_u = 0` otherwise) and `b_p = w_p^2 H_pp - 2 w_p c_p`, `y_p = w_p` (pruned p; `b_p = inf`,
`y_p = 0` otherwise). The search is a (min, +) reduction, not a GEMM: every (u, p) pair costs
one multiply, one FMA and one min per row, and the only operand shared between rows is the
tile of `H`.

`_swap_terms_kernel` (unstructured pre-pass, O(rows * cols)): `b_p`, `y_p` of the searched
rows into scratch `B`, `Y` padded to whole row blocks and p tiles (`inf`, `0`), so the hot
loop reads two arrays with no masks.

`_swap_search_kernel` (unstructured): grid `(row blocks, u splits)`. A program owns `BLOCK_R`
rows and a contiguous range of u columns; it walks that range in `BLOCK_U` tiles and, for
each, all p columns in `BLOCK_P` tiles. Each `[BLOCK_U, BLOCK_P]` tile of `H` is loaded
once and broadcast over the program's rows; the hot loop is `acc = min(acc, b_p + x_u *
(H_up * y_p))` on an elementwise `[BLOCK_R, BLOCK_U, BLOCK_P]` register accumulator (mul, FMA,
min per pair: no cross-thread reduction, no index tracking). After a u tile the accumulator
is reduced over p (once per `cols` pairs), `a_u` added, and each row keeps its best u; the
epilogue walks that u's `cols` pairs once more per row to recover p and Δ (O(rows * cols)).
With more than one u split, partial results `[splits, rows]` are reduced by a tiny torch
`min` (two-stage reduction). No `[rows, cols, cols]` tensor ever exists.

`_swap_search_nm_kernel` (N:M): pairs lie inside one group of `prune_m` columns, so a row has
only `cols * prune_m` pairs; a program owns `BLOCK_R` rows and walks the columns in chunks of
`BLOCK_C` u columns, forming `[BLOCK_R, BLOCK_C, m]` candidate tensors (p addressed by
pointer inside u's group) and reducing them in registers (memory bound).

Dtypes: float32 (what the driver passes on GPU) and float64 (computed in float64); `c` and `H`
are cast to `w`'s dtype if they differ. `keep` is a bool tensor, read through a uint8 view;
operands without a unit column stride are copied once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# ------------------------------------------------------------------------------ kernels


@triton.jit
def _swap_terms_kernel(
    W_ptr,
    K_ptr,
    C_ptr,
    H_ptr,
    ROW_ptr,
    B_ptr,
    Y_ptr,
    n_rows,
    n_cols,
    n_cols_pad,
    stride_wm,
    stride_km,
    stride_cm,
    stride_hm,
    stride_bm,
    HAS_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """p-side terms of row i (of `rows` if given): `b_p = w_p^2 H_pp - 2 w_p c_p`, `y_p = w_p`
    for pruned p; `b = inf`, `y = 0` for kept p and for the padding rows/columns of B, Y."""
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = (offs < n_cols) & ((offs * 0 + i) < n_rows)  # (row test broadcast to a tensor)
    if HAS_ROWS:
        r = tl.load(ROW_ptr + tl.minimum(i, n_rows - 1)).to(tl.int64)
    else:
        r = tl.minimum(i, n_rows - 1).to(tl.int64)
    w = tl.load(W_ptr + r * stride_wm + offs, mask=valid, other=0.0)
    k = tl.load(K_ptr + r * stride_km + offs, mask=valid, other=1)
    c = tl.load(C_ptr + r * stride_cm + offs, mask=valid, other=0.0)
    hd = tl.load(H_ptr + offs.to(tl.int64) * (stride_hm + 1), mask=valid, other=0.0)
    cand = (k == 0) & valid
    inb = offs < n_cols_pad
    b = tl.where(cand, w * w * hd - 2.0 * w * c, float("inf"))
    tl.store(B_ptr + i * stride_bm + offs, b, mask=inb)
    tl.store(Y_ptr + i * stride_bm + offs, tl.where(cand, w, 0.0), mask=inb)


@triton.jit
def _row_bases(
    W_ptr,
    K_ptr,
    C_ptr,
    ROW_ptr,
    offs_r,
    rmask,
    stride_wm,
    stride_km,
    stride_cm,
    HAS_ROWS: tl.constexpr,
):
    """Base pointers of the rows a program searches: rows `ROW_ptr[offs_r]` if given, else
    `offs_r`; lanes past `n_rows` (`~rmask`) get unused pointers the caller masks."""
    if HAS_ROWS:
        ridx = tl.load(ROW_ptr + offs_r, mask=rmask, other=0).to(tl.int64)
    else:
        ridx = offs_r.to(tl.int64)
    return W_ptr + ridx * stride_wm, K_ptr + ridx * stride_km, C_ptr + ridx * stride_cm


@triton.jit
def _swap_search_kernel(
    W_ptr,
    K_ptr,
    C_ptr,
    H_ptr,
    ROW_ptr,
    B_ptr,
    Y_ptr,
    VAL_ptr,
    U_ptr,
    P_ptr,
    n_rows,
    n_cols,
    u_chunk,
    stride_wm,
    stride_km,
    stride_cm,
    stride_hm,
    stride_bm,
    stride_om,
    HAS_ROWS: tl.constexpr,
    EVEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Best (u, p, Δ) per row over kept u in this program's u range and all pruned p.

    Δ = a_u + b_p + x_u * H_up * y_p (see the module docstring); B, Y hold b_p, y_p padded to
    whole row blocks and p tiles (`inf`, `0`), so the hot loop needs no row/p masks. Per pair:
    one multiply, one FMA, one min into an elementwise accumulator `[R, U, P]` (min over p
    tiles at each in-tile offset; no cross-thread reduction, no index tracking). Per u tile
    the accumulator is reduced over p, `a_u` added, and each row keeps its best u; the
    epilogue walks that u's row of pairs once more to recover p. Writes one partial result
    per row at `[pid_s, row]` of VAL/U/P (`+inf` where the range holds no pair).
    EVEN: `n_cols` is a multiple of BLOCK_U and BLOCK_P (no masks on H tiles).
    """
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    dt = W_ptr.dtype.element_ty
    INF = float("inf")

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < n_rows
    w_row, k_row, c_row = _row_bases(  # [R] row base pointers
        W_ptr, K_ptr, C_ptr, ROW_ptr, offs_r, rmask, stride_wm, stride_km, stride_cm, HAS_ROWS
    )
    b_row = B_ptr + offs_r.to(tl.int64) * stride_bm  # scratch rows (padded: always valid)
    y_row = Y_ptr + offs_r.to(tl.int64) * stride_bm
    hd_stride = stride_hm + 1  # diag(H)

    u_begin = pid_s * u_chunk
    u_end = tl.minimum(u_begin + u_chunk, n_cols)
    ar_u = tl.arange(0, BLOCK_U)
    ar_p = tl.arange(0, BLOCK_P)

    best_v = tl.full([BLOCK_R], INF, dtype=dt)
    best_u = tl.zeros([BLOCK_R], dtype=tl.int32)
    for u0 in range(u_begin, u_end, BLOCK_U):
        offs_u = u0 + ar_u
        umask = offs_u < u_end
        m_ru = rmask[:, None] & umask[None, :]
        w_u = tl.load(w_row[:, None] + offs_u[None, :], mask=m_ru, other=0.0)
        k_u = tl.load(k_row[:, None] + offs_u[None, :], mask=m_ru, other=0)
        c_u = tl.load(c_row[:, None] + offs_u[None, :], mask=m_ru, other=0.0)
        hd_u = tl.load(H_ptr + offs_u.to(tl.int64) * hd_stride, mask=umask, other=0.0)
        cand_u = (k_u != 0) & m_ru
        a_u = tl.where(cand_u, w_u * w_u * hd_u[None, :] + 2.0 * w_u * c_u, INF)
        x_u = tl.where(cand_u, -2.0 * w_u, 0.0)
        h_rows = H_ptr + offs_u.to(tl.int64)[:, None] * stride_hm  # [U, 1]

        acc = tl.full([BLOCK_R, BLOCK_U, BLOCK_P], INF, dtype=dt)
        for p0 in range(0, n_cols, BLOCK_P):
            offs_p = p0 + ar_p
            # [U, P] tile of H, loaded once and shared by all rows of the program
            if EVEN:
                h = tl.load(h_rows + offs_p[None, :])
            else:
                hmask = umask[:, None] & (offs_p < n_cols)[None, :]
                h = tl.load(h_rows + offs_p[None, :], mask=hmask, other=0.0)
            b_p = tl.load(b_row[:, None] + offs_p[None, :])  # [R, P]
            y_p = tl.load(y_row[:, None] + offs_p[None, :])
            # [R, U, P]: b_p + x_u * (H_up * y_p); a_u is added after the min over p
            q = b_p[:, None, :] + x_u[:, :, None] * (h[None, :, :] * y_p[:, None, :])
            acc = tl.minimum(acc, q)

        tot = tl.min(acc, axis=2) + a_u  # [R, U]
        v, j = tl.min(tot, axis=1, return_indices=True)
        better = v < best_v
        best_v = tl.where(better, v, best_v)
        best_u = tl.where(better, u0 + j, best_u)

    # epilogue: walk each row's best u once more over all p to recover p and Δ
    bu = best_u.to(tl.int64)
    w_bu = tl.load(w_row + bu, mask=rmask, other=0.0)
    k_bu = tl.load(k_row + bu, mask=rmask, other=0)
    c_bu = tl.load(c_row + bu, mask=rmask, other=0.0)
    hd_bu = tl.load(H_ptr + bu * hd_stride, mask=rmask, other=0.0)
    cand_bu = (k_bu != 0) & rmask
    a_bu = tl.where(cand_bu, w_bu * w_bu * hd_bu + 2.0 * w_bu * c_bu, INF)
    x_bu = tl.where(cand_bu, -2.0 * w_bu, 0.0)
    h_bu = H_ptr + bu * stride_hm  # [R] rows of H
    qbest = tl.full([BLOCK_R], INF, dtype=dt)
    pbest = tl.zeros([BLOCK_R], dtype=tl.int32)
    for p0 in range(0, n_cols, BLOCK_P):
        offs_p = p0 + ar_p
        m_rp = rmask[:, None] & (offs_p < n_cols)[None, :]
        h = tl.load(h_bu[:, None] + offs_p[None, :], mask=m_rp, other=0.0)
        b_p = tl.load(b_row[:, None] + offs_p[None, :])
        y_p = tl.load(y_row[:, None] + offs_p[None, :])
        q = b_p + x_bu[:, None] * (h * y_p)
        qv, jp = tl.min(q, axis=1, return_indices=True)
        better = qv < qbest
        qbest = tl.where(better, qv, qbest)
        pbest = tl.where(better, p0 + jp, pbest)
    delta = tl.where(best_v < INF, a_bu + qbest, INF)

    out = pid_s * stride_om + offs_r
    tl.store(VAL_ptr + out, delta, mask=rmask)
    tl.store(U_ptr + out, best_u.to(tl.int64), mask=rmask)
    tl.store(P_ptr + out, pbest.to(tl.int64), mask=rmask)


@triton.jit
def _swap_search_nm_kernel(
    W_ptr,
    K_ptr,
    C_ptr,
    H_ptr,
    ROW_ptr,
    VAL_ptr,
    U_ptr,
    P_ptr,
    n_rows,
    n_cols,
    prune_m,
    stride_wm,
    stride_km,
    stride_cm,
    stride_hm,
    HAS_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """N:M best swap per row: u and p in one group of `prune_m` columns.

    For column chunk `[c0, c0 + BLOCK_C)`, u runs over the chunk and
    `p = (u // m) * m + k`, `k < m`; Δ = a_u + b_p + x_u * H_up * y_p on `[R, C, BLOCK_M]`.
    """
    pid_r = tl.program_id(0)
    dt = W_ptr.dtype.element_ty
    INF = float("inf")

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < n_rows
    w_row, k_row, c_row = _row_bases(  # [R] row base pointers
        W_ptr, K_ptr, C_ptr, ROW_ptr, offs_r, rmask, stride_wm, stride_km, stride_cm, HAS_ROWS
    )
    ar_c = tl.arange(0, BLOCK_C)
    ar_m = tl.arange(0, BLOCK_M)
    flat = ar_c[:, None] * BLOCK_M + ar_m[None, :]  # [C, M]: candidate order, u-major

    best_v = tl.full([BLOCK_R], INF, dtype=dt)
    best_u = tl.zeros([BLOCK_R], dtype=tl.int32)
    best_p = tl.zeros([BLOCK_R], dtype=tl.int32)
    for c0 in range(0, n_cols, BLOCK_C):
        offs_u = c0 + ar_c  # [C]
        umask = offs_u < n_cols
        offs_p = (offs_u // prune_m * prune_m)[:, None] + ar_m[None, :]  # [C, M]
        pmask = umask[:, None] & (ar_m[None, :] < prune_m)
        m_ru = rmask[:, None] & umask[None, :]
        w_u = tl.load(w_row[:, None] + offs_u[None, :], mask=m_ru, other=0.0)
        k_u = tl.load(k_row[:, None] + offs_u[None, :], mask=m_ru, other=0)
        c_u = tl.load(c_row[:, None] + offs_u[None, :], mask=m_ru, other=0.0)
        hd_u = tl.load(H_ptr + offs_u.to(tl.int64) * (stride_hm + 1), mask=umask, other=0.0)
        cand_u = (k_u != 0) & m_ru
        a_u = tl.where(cand_u, w_u * w_u * hd_u[None, :] + 2.0 * w_u * c_u, INF)
        x_u = tl.where(cand_u, -2.0 * w_u, 0.0)

        m_rp = rmask[:, None, None] & pmask[None, :, :]
        p3 = offs_p[None, :, :]
        w_p = tl.load(w_row[:, None, None] + p3, mask=m_rp, other=0.0)
        k_p = tl.load(k_row[:, None, None] + p3, mask=m_rp, other=1)
        c_p = tl.load(c_row[:, None, None] + p3, mask=m_rp, other=0.0)
        hd_p = tl.load(H_ptr + offs_p.to(tl.int64) * (stride_hm + 1), mask=pmask, other=0.0)
        cand_p = (k_p == 0) & m_rp
        b_p = tl.where(cand_p, w_p * w_p * hd_p[None, :, :] - 2.0 * w_p * c_p, INF)
        y_p = tl.where(cand_p, w_p, 0.0)
        h = tl.load(
            H_ptr + offs_u.to(tl.int64)[:, None] * stride_hm + offs_p, mask=pmask, other=0.0
        )  # [C, M]: H[u, p], shared by all rows
        q = a_u[:, :, None] + b_p + x_u[:, :, None] * (h[None, :, :] * y_p)  # [R, C, M]
        # min over the chunk, then the first flat index (u-major) that attains it: two plain
        # reductions instead of an argmin over a reshaped tensor, which compiled to wrong
        # indices on sm_90 (triton 3.6) while the interpreter got them right
        v = tl.min(tl.min(q, axis=2), axis=1)  # [R]
        hit = tl.where(q == v[:, None, None], flat[None, :, :], BLOCK_C * BLOCK_M)
        j = tl.min(tl.min(hit, axis=2), axis=1)  # [R]
        jc = j // BLOCK_M
        better = v < best_v
        best_v = tl.where(better, v, best_v)
        best_u = tl.where(better, c0 + jc, best_u)
        best_p = tl.where(better, (c0 + jc) // prune_m * prune_m + j % BLOCK_M, best_p)

    tl.store(VAL_ptr + offs_r, best_v, mask=rmask)
    tl.store(U_ptr + offs_r, best_u.to(tl.int64), mask=rmask)
    tl.store(P_ptr + offs_r, best_p.to(tl.int64), mask=rmask)


# ------------------------------------------------------------------------------ launchers


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _prepare(w, keep, c, H):
    if w.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"w must be float32 or float64, got {w.dtype}")
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor, got {keep.dtype}")
    if w.shape != keep.shape or w.shape != c.shape:
        raise ValueError(
            f"w, keep and c must have one shape; got {w.shape}, {keep.shape}, {c.shape}"
        )
    if H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"H must be [cols, cols] = {w.shape[1]}, got {tuple(H.shape)}")

    def unit(t):  # unit column stride; rows may be strided
        return t if t.stride(-1) == 1 else t.contiguous()

    return unit(w), unit(keep), unit(c.to(w.dtype)), unit(H.to(w.dtype))


def _n_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def triton_swap_search_unsupported(w, keep, c, H, prune_n=0, prune_m=0, rows=None, **_tuning):
    if w.dtype not in (torch.float32, torch.float64):
        return f"float32/float64 only, got {w.dtype}"
    return None


def triton_swap_search(
    w: torch.Tensor,
    keep: torch.Tensor,
    c: torch.Tensor,
    H: torch.Tensor,
    prune_n: int = 0,
    prune_m: int = 0,
    *,
    rows: torch.Tensor | None = None,
    block_r: int | None = None,
    block_u: int | None = None,
    block_p: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
):
    """`(u, p, delta)` (int64, int64, w's dtype). `rows` are searched in place (no gathered
    copies). Tile sizes, the number of u splits (two-stage reduction) and warps are tunable;
    defaults suit an H100 (and larger tiles under the interpreter, where each tile op costs
    Python overhead)."""
    w, keep, c, H = _prepare(w, keep, c, H)
    cols = w.shape[1]
    n = w.shape[0] if rows is None else rows.numel()
    dev = w.device
    u_out = torch.zeros(n, dtype=torch.long, device=dev)
    p_out = torch.zeros(n, dtype=torch.long, device=dev)
    if n == 0 or cols == 0:
        return u_out, p_out, torch.full((n,), float("inf"), dtype=w.dtype, device=dev)
    keep8 = keep.view(torch.uint8)
    has_rows = rows is not None
    row_arg = rows.to(device=dev, dtype=torch.long).contiguous() if has_rows else u_out
    interp = _interpreted()

    if prune_n:
        m = int(prune_m)
        if m <= 0 or cols % m:
            raise ValueError(f"prune_m must divide cols = {cols}, got {prune_m}")
        bm = triton.next_power_of_2(m)
        # u runs over a chunk of BLOCK_C columns (groups may straddle chunks: p is addressed
        # by pointer, so every u still meets exactly its own group). GPU: ~2048 candidates
        # per program (no spills on sm_90 in float32 or float64).
        br = block_r or (16 if interp else 4)
        bc = triton.next_power_of_2(block_u or (256 if interp else max(16, 512 // bm)))
        val = torch.empty(n, dtype=w.dtype, device=dev)
        grid = (triton.cdiv(n, br),)
        _swap_search_nm_kernel[grid](
            w,
            keep8,
            c,
            H,
            row_arg,
            val,
            u_out,
            p_out,
            n,
            cols,
            m,
            w.stride(0),
            keep8.stride(0),
            c.stride(0),
            H.stride(0),
            HAS_ROWS=has_rows,
            BLOCK_R=br,
            BLOCK_C=bc,
            BLOCK_M=bm,
            num_warps=num_warps or 4,
        )
        return u_out, p_out, val

    # GPU defaults: 64 accumulators per thread at 8 warps, a hot loop of mul, FMA and min per
    # pair plus loads (its instruction count on sm_90: benchmarks/results/README.md); H
    # traffic 1/16 and B, Y traffic 2/32 elements per pair (float64: 8 rows). Interpreter:
    # fewer, larger tiles.
    br = block_r or (8 if w.dtype == torch.float64 and not interp else 16)
    bu = block_u or (64 if interp else 32)
    bp = block_p or (128 if interp else 32)
    row_blocks = triton.cdiv(n, br)
    u_tiles = triton.cdiv(cols, bu)
    if splits is None:  # enough programs to fill the GPU as the active set shrinks
        splits = 1 if interp else triton.cdiv(4 * _n_sm(dev), row_blocks)
    splits = max(1, min(int(splits), u_tiles))
    u_chunk = triton.cdiv(u_tiles, splits) * bu
    splits = triton.cdiv(cols, u_chunk)
    # p-side terms, padded to whole row blocks and p tiles (b = inf, y = 0)
    n_pad = row_blocks * br
    cols_pad = triton.cdiv(cols, bp) * bp
    B = torch.empty(n_pad, cols_pad, dtype=w.dtype, device=dev)
    Y = torch.empty_like(B)
    bn = min(triton.next_power_of_2(cols_pad), 4096 if interp else 1024)
    _swap_terms_kernel[(n_pad, triton.cdiv(cols_pad, bn))](
        w,
        keep8,
        c,
        H,
        row_arg,
        B,
        Y,
        n,
        cols,
        cols_pad,
        w.stride(0),
        keep8.stride(0),
        c.stride(0),
        H.stride(0),
        B.stride(0),
        HAS_ROWS=has_rows,
        BLOCK_N=bn,
    )
    if splits == 1:
        val, uo, po = torch.empty(n, dtype=w.dtype, device=dev), u_out, p_out
    else:
        val = torch.empty(splits, n, dtype=w.dtype, device=dev)
        uo = torch.empty(splits, n, dtype=torch.long, device=dev)
        po = torch.empty(splits, n, dtype=torch.long, device=dev)
    _swap_search_kernel[(row_blocks, splits)](
        w,
        keep8,
        c,
        H,
        row_arg,
        B,
        Y,
        val,
        uo,
        po,
        n,
        cols,
        u_chunk,
        w.stride(0),
        keep8.stride(0),
        c.stride(0),
        H.stride(0),
        B.stride(0),
        n,
        HAS_ROWS=has_rows,
        EVEN=cols % bu == 0 and cols % bp == 0,
        BLOCK_R=br,
        BLOCK_U=bu,
        BLOCK_P=bp,
        num_warps=num_warps or (4 if interp else 8),
    )
    if splits == 1:
        return u_out, p_out, val
    best, s = val.min(dim=0)  # second stage: [splits, n] -> [n]
    s = s[None]
    return uo.gather(0, s)[0], po.gather(0, s)[0], best


OPS = {"swap_search": (triton_swap_search, triton_swap_search_unsupported)}
