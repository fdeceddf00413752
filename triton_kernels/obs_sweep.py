"""Triton `obs_sweep` (contract: `fastprune.ops.obs_sweep`): the fused in-block OBS sweep,
one launch per block of columns.

Design: grid `(cdiv(rows, BLOCK_R), E)` (E: layers of a batch, 1 for one layer; the batch
strides select each program's layer); every program owns `BLOCK_R` rows and the whole block
of columns (padded to `BLOCK_C`, a power of two >= 16, blocksize up to 256) as a float32
register tile and sweeps the columns in a loop. Column `i` is frozen once it is swept (its
update mask is `j > i`), so after the loop `Q1 = where(pruned, 0, W)` and
`Err1 = where(pruned, W / d, 0)` are formed from the tile and written once, coalesced. N:M
groups are chosen in registers by `PRUNE_N` argmin passes over the group's columns, forced
entries (`HAS_KEEP`) entering them with score -1 (ranked before every real score, >= 0).
Rows are independent, so programs never communicate. The trailing update of the columns
right of the block stays a GEMM in the driver.

State is float32 for fp32/fp16/bf16 inputs and float64 when `W1` or `Hinv1` is float64 (the
drivers pass float64 working copies only for float64 layers); outputs are in that state
dtype. Kernels import nothing of fastprune.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _div(x, y, F64: tl.constexpr):
    """IEEE round-to-nearest division (Triton's fp32 `/` is approximate on GPUs)."""
    if F64:
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def _obs_sweep_kernel(
    W_ptr,
    Hinv_ptr,
    K_ptr,
    Q_ptr,
    E_ptr,
    L_ptr,
    Kout_ptr,
    rows,
    count,
    stride_wm,
    stride_wn,
    stride_hm,
    stride_hn,
    stride_km,
    stride_kn,
    stride_qm,
    stride_qn,
    stride_wb,
    stride_hb,
    stride_kb,
    stride_qb,
    stride_lb,
    PRUNE_N: tl.constexpr,
    PRUNE_M: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    ACC: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)  # the layer of a batch (0 for one layer)
    W_ptr += b * stride_wb
    Hinv_ptr += b * stride_hb
    K_ptr += b * stride_kb
    Q_ptr += b * stride_qb
    E_ptr += b * stride_qb
    Kout_ptr += b * stride_qb
    L_ptr += b * stride_lb
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rmask = r < rows
    cmask = c < count
    m2 = rmask[:, None] & cmask[None, :]

    W = tl.load(W_ptr + r[:, None] * stride_wm + c[None, :] * stride_wn, mask=m2, other=0.0)
    W = W.to(ACC)
    # diagonal of Hinv1 (1 in padded columns so the final division stays finite)
    d = tl.load(Hinv_ptr + c * (stride_hm + stride_hn), mask=cmask, other=1.0).to(ACC)
    # P: pruned; under N:M it starts as the forced entries (keep1 == 0) and groups add theirs
    if HAS_KEEP:
        K = tl.load(K_ptr + r[:, None] * stride_km + c[None, :] * stride_kn, mask=m2, other=1)
        P = K == 0
    else:
        P = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32) != 0
    F = P  # forced (N:M): they rank as score -1, before any real score (all >= 0)

    for i in range(0, count):
        if PRUNE_N > 0:  # noqa: SIM102 (constexpr test; a runtime one inside)
            if i % PRUNE_M == 0:
                # the group's PRUNE_N lowest w^2/d^2 from the updated weights (first index
                # wins an exact tie); the fast division is fine here: the updated weights
                # already differ from the reference's by float rounding
                grp = (c >= i) & (c < i + PRUNE_M)
                S = tl.where(F, -1.0, (W * W) / (d * d)[None, :])
                S = tl.where(grp[None, :], S, float("inf"))
                for _ in tl.static_range(PRUNE_N):
                    j = tl.argmin(S, axis=1)
                    sel = c[None, :] == j[:, None]
                    P = P | sel
                    S = tl.where(sel, float("inf"), S)
        d_i = tl.load(Hinv_ptr + i * (stride_hm + stride_hn)).to(ACC)
        h = tl.load(Hinv_ptr + i * stride_hm + c * stride_hn, mask=(c > i) & cmask, other=0.0)
        h = h.to(ACC)
        # err_i = (w_i - q_i) / d_i: w_i where column i is pruned, else 0
        wp = tl.sum(tl.where(P & (c[None, :] == i), W, 0.0), axis=1)
        err = _div(wp, d_i, F64)
        W = W - err[:, None] * h[None, :]

    Q = tl.where(P, 0.0, W)
    E = tl.where(P, _div(W, d[None, :], F64), 0.0)
    loss = tl.sum(E * E, axis=1) / 2
    out = r[:, None] * stride_qm + c[None, :] * stride_qn
    tl.store(Q_ptr + out, Q, mask=m2)
    tl.store(E_ptr + out, E, mask=m2)
    tl.store(L_ptr + r, loss, mask=rmask)
    if PRUNE_N > 0:
        tl.store(Kout_ptr + out, (~P).to(tl.int8), mask=m2)


def _tile(rows: int, count: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): about 4096 fp32 state elements per program (untuned on
    hardware: a heuristic that keeps the tile in registers for blocksize up to 256)."""
    block_c = max(16, triton.next_power_of_2(count))
    block_r = max(1, min(triton.next_power_of_2(rows), 4096 // block_c))
    return block_r, block_c, 4


def triton_obs_sweep_unsupported(W1, Hinv1, keep1, prune_n=0, prune_m=0):
    return None  # any float dtype (float64 state for float64 inputs), any block width


def triton_obs_sweep(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    keep1: torch.Tensor | None,
    prune_n: int = 0,
    prune_m: int = 0,
):
    """`(Q1, Err1, keep1, loss_rows)` in float32 (float64 if an input is float64) for one
    layer (`W1 [rows, count]`, `Hinv1 [count, count]`) or a batch of E in one launch (grid
    `(row tiles, E)`: `W1 [E, rows, count]`, `Hinv1 [E, count, count]`, `keep1` as W1;
    every output gains the leading `E`). W1 may have any strides and is not modified."""
    if W1.dim() == 2:
        if Hinv1.shape != (W1.shape[1], W1.shape[1]):
            raise ValueError(
                f"W1 must be [rows, count] and Hinv1 [count, count], got "
                f"{tuple(W1.shape)} and {tuple(Hinv1.shape)}"
            )
        one = None if keep1 is None else keep1[None]
        Q, E, keep, loss = triton_obs_sweep(W1[None], Hinv1[None], one, prune_n, prune_m)
        return Q[0], E[0], keep1 if keep is one else keep[0], loss[0]
    if W1.dim() != 3 or Hinv1.shape != (W1.shape[0], W1.shape[2], W1.shape[2]):
        raise ValueError(
            f"W1 must be [E, rows, count] and Hinv1 [E, count, count], got "
            f"{tuple(W1.shape)} and {tuple(Hinv1.shape)}"
        )
    if W1.device != Hinv1.device:
        raise ValueError(f"W1 is on {W1.device}, Hinv1 on {Hinv1.device}")
    layers, rows, count = W1.shape
    nm = prune_n > 0
    if nm and (prune_m <= 0 or prune_n > prune_m or count % prune_m):
        raise ValueError(
            f"N:M sweep needs 0 < prune_n <= prune_m dividing count; got "
            f"{prune_n}:{prune_m} with count={count}"
        )
    if keep1 is None and not nm:
        raise ValueError("keep1 is required for an unstructured or fixed-mask sweep")
    if keep1 is not None and (keep1.shape != W1.shape or keep1.dtype != torch.bool):
        raise ValueError(f"keep1 must be a bool tensor of shape {tuple(W1.shape)}")
    f64 = torch.float64 in (W1.dtype, Hinv1.dtype)
    state = torch.float64 if f64 else torch.float32
    dev = W1.device
    Q = torch.empty(layers, rows, count, dtype=state, device=dev)
    E = torch.empty_like(Q)
    loss = torch.empty(layers, rows, dtype=state, device=dev)
    if layers == 0 or rows == 0 or count == 0:
        loss.zero_()
        return Q, E, torch.ones(W1.shape, dtype=torch.bool, device=dev), loss
    k_out = torch.empty(W1.shape, dtype=torch.int8, device=dev) if nm else Q  # Q: unused
    k_in = keep1.view(torch.uint8) if keep1 is not None else Q  # same strides, no copy
    block_r, block_c, warps = _tile(rows, count)
    grid = (triton.cdiv(rows, block_r), layers)
    _obs_sweep_kernel[grid](
        W1,
        Hinv1,
        k_in,
        Q,
        E,
        loss,
        k_out,
        rows,
        count,
        W1.stride(1),
        W1.stride(2),
        Hinv1.stride(1),
        Hinv1.stride(2),
        k_in.stride(1),
        k_in.stride(2),
        Q.stride(1),
        Q.stride(2),
        W1.stride(0),
        Hinv1.stride(0),
        k_in.stride(0),
        Q.stride(0),
        loss.stride(0),
        PRUNE_N=prune_n if nm else 0,
        PRUNE_M=prune_m if nm else 1,
        HAS_KEEP=keep1 is not None,
        ACC=tl.float64 if f64 else tl.float32,
        F64=f64,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return Q, E, k_out.view(torch.bool) if nm else keep1, loss


triton_obs_sweep_batched = triton_obs_sweep  # the former name of the batched launch

OPS = {"obs_sweep": (triton_obs_sweep, triton_obs_sweep_unsupported)}
BATCHED = frozenset({"obs_sweep"})  # takes W1 [E, rows, count] (grid: row tiles x layers)
