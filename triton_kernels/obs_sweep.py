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

Quantization (`QUANT`): each swept column is rounded to its group's grid in registers and
written back into the tile in place of the weight (so the tile ends as `Q1`), its error kept
in a second tile. A group's grid is loaded from `scale`/`zero` at its first column or, with
`FIND`, found there from the tile's updated columns (and written out). Rounding is exact
IEEE arithmetic: `rint` by the 2^23 (2^52) magic number, float8 e4m3 by rounding onto its
grid with power-of-two scalings (the interpreter's float8 cast does not round to nearest
even, and sm_80 has none), so both run the same on the interpreter and on any GPU.

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
def _rint(x, F64: tl.constexpr):
    """Round half to even (torch.round): adding and removing 2^23 (2^52) rounds in IEEE
    arithmetic; larger magnitudes are already integers."""
    if F64:
        big: tl.constexpr = 4503599627370496.0
    else:
        big: tl.constexpr = 8388608.0
    m = tl.where(x < 0, -big, big).to(x.dtype)
    return tl.where(tl.abs(x) < big, (x + m) - m, x)


@triton.jit
def _e4m3(x):
    """float32 `x` rounded to float8 e4m3fn (round to nearest even, saturated to +-448 as
    torch's cast): `rint(x * 2^(3-e)) * 2^(e-3)` with e the binade (at least -6)."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    e = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    up = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e), exact scaling
    down = ((124 + e) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    return _rint(x * up, False) * down


@triton.jit
def _quantize(w, sc, zr, maxq, FP8: tl.constexpr, F64: tl.constexpr):
    """`w` on the grid (`sc`, `zr`): `sc * (clamp(rint(w / sc) + zr, 0, maxq) - zr)`, or
    float8 e4m3 of `w / sc` times `sc` (through float32, as torch casts float64)."""
    x = _div(w, sc, F64)
    if FP8:
        return _e4m3(x.to(tl.float32)).to(w.dtype) * sc
    else:
        c = tl.minimum(tl.maximum(_rint(x, F64) + zr, 0.0), maxq)
        return sc * (c - zr)


@triton.jit
def _find_grid(W, grp, maxq, SYM: tl.constexpr, FP8: tl.constexpr, F64: tl.constexpr):
    """(scale, zero) per row from the tile's columns `grp` (GPTQ's find_params)."""
    x = tl.where(grp, W, 0.0)  # the zeros make min/max include 0, as find_params does
    if FP8:
        amax = tl.max(tl.abs(x), axis=1)
        sc = tl.where(amax == 0, 1.0, _div(amax, 448.0, F64))
        return sc, tl.zeros_like(sc)
    else:
        lo = tl.min(x, axis=1)
        hi = tl.max(x, axis=1)
        if SYM:
            hi = tl.maximum(-lo, hi)
            lo = tl.where(lo < 0, -hi, lo)
        dead = (lo == 0) & (hi == 0)
        lo = tl.where(dead, -1.0, lo)
        hi = tl.where(dead, 1.0, hi)
        sc = _div(hi - lo, maxq, F64)
        if SYM:
            zr = tl.zeros_like(sc) + (maxq + 1) / 2
        else:
            zr = _rint(_div(-lo, sc, F64), F64)
        return sc, zr


@triton.jit
def _obs_sweep_kernel(
    W_ptr,
    Hinv_ptr,
    K_ptr,
    Q_ptr,
    E_ptr,
    L_ptr,
    Kout_ptr,
    S_ptr,
    Z_ptr,
    rows,
    count,
    groups,
    group_size,
    maxq,
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
    QUANT: tl.constexpr,
    FP8: tl.constexpr,
    SYM: tl.constexpr,
    FIND: tl.constexpr,
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
    S_ptr += b * rows * groups  # scale/zero: [layers, rows, groups] contiguous
    Z_ptr += b * rows * groups
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
    if QUANT:
        Err = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
        sc = tl.full([BLOCK_R], 1.0, dtype=ACC)  # the current group's grid, per row
        zr = tl.zeros([BLOCK_R], dtype=ACC)

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
        if QUANT:
            if i % group_size == 0:
                g = i // group_size
                if FIND:  # the group's grid from its updated columns, written out
                    grp = (c >= i) & (c < i + group_size) & cmask
                    sc, zr = _find_grid(W, grp[None, :], maxq, SYM, FP8, F64)
                    tl.store(S_ptr + r * groups + g, sc, mask=rmask)
                    tl.store(Z_ptr + r * groups + g, zr, mask=rmask)
                else:
                    sc = tl.load(S_ptr + r * groups + g, mask=rmask, other=1.0).to(ACC)
                    zr = tl.load(Z_ptr + r * groups + g, mask=rmask, other=0.0).to(ACC)
            # q_i = quant(w_i * keep_i); err_i = (w_i - q_i) / d_i; column i then holds q_i
            col = c[None, :] == i
            w_i = tl.sum(tl.where(col, W, 0.0), axis=1)
            p_i = tl.sum(tl.where(col & P, 1, 0), axis=1) > 0
            q_i = _quantize(tl.where(p_i, 0.0, w_i), sc, zr, maxq, FP8, F64)
            err = _div(w_i - q_i, d_i, F64)
            W = tl.where(col, q_i[:, None], W)
            Err = tl.where(col, err[:, None], Err)
        else:
            # err_i = (w_i - q_i) / d_i: w_i where column i is pruned, else 0
            wp = tl.sum(tl.where(P & (c[None, :] == i), W, 0.0), axis=1)
            err = _div(wp, d_i, F64)
        W = W - err[:, None] * h[None, :]

    if QUANT:  # each swept column holds its q_i
        Q = W
        E = Err
    else:
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


def triton_obs_sweep_unsupported(W1, Hinv1, keep1, prune_n=0, prune_m=0, quant=None):
    return None  # any float dtype (float64 state for float64 inputs), any block width, any grid


def _grids(quant, W1: torch.Tensor, state: torch.dtype):
    """The kernel's in/out `(scale, zero)`: `[layers, rows, groups]` contiguous copies of the
    grids in the state dtype (the kernel overwrites the groups it finds)."""
    count = W1.shape[2]
    gs = quant.group_size
    if not isinstance(gs, int) or gs < 1:
        raise ValueError(f"quant.group_size must be a positive int, got {gs!r}")
    if not quant.fp8 and not 1 <= quant.maxq <= 255:
        raise ValueError(f"quant.maxq must be in [1, 255], got {quant.maxq}")
    groups = -(-count // gs)
    want = (*W1.shape[:2], groups)
    out = []
    for name in ("scale", "zero"):
        t = getattr(quant, name)
        t = t[None] if t is not None and t.dim() == 2 else t
        if t is None or tuple(t.shape) != want:
            got = None if t is None else tuple(t.shape)
            raise ValueError(
                f"quant.{name} must be [(E,) rows, {groups}] for {count} columns in groups "
                f"of {gs}, got {got}"
            )
        out.append(t.to(device=W1.device, dtype=state, copy=True).contiguous())
    return out


def triton_obs_sweep(
    W1: torch.Tensor,
    Hinv1: torch.Tensor,
    keep1: torch.Tensor | None,
    prune_n: int = 0,
    prune_m: int = 0,
    quant=None,
):
    """`(Q1, Err1, keep1, loss_rows)` in float32 (float64 if an input is float64) for one
    layer (`W1 [rows, count]`, `Hinv1 [count, count]`) or a batch of E in one launch (grid
    `(row tiles, E)`: `W1 [E, rows, count]`, `Hinv1 [E, count, count]`, `keep1` as W1;
    every output gains the leading `E`). W1 may have any strides and is not modified.
    With `quant` (the op's `QuantBlock`) the kept weights are rounded to their group's grid
    and the grids used, `(scale, zero)` `[(E,) rows, groups]`, follow the four outputs."""
    if W1.dim() == 2:
        if Hinv1.shape != (W1.shape[1], W1.shape[1]):
            raise ValueError(
                f"W1 must be [rows, count] and Hinv1 [count, count], got "
                f"{tuple(W1.shape)} and {tuple(Hinv1.shape)}"
            )
        one = None if keep1 is None else keep1[None]
        out = triton_obs_sweep(W1[None], Hinv1[None], one, prune_n, prune_m, quant)
        Q, E, keep, loss = out[:4]
        first = (Q[0], E[0], keep1 if keep is one else keep[0], loss[0])
        return first + tuple(t[0] for t in out[4:])
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
    grids = () if quant is None else tuple(_grids(quant, W1, state))
    Q = torch.empty(layers, rows, count, dtype=state, device=dev)
    E = torch.empty_like(Q)
    loss = torch.empty(layers, rows, dtype=state, device=dev)
    if layers == 0 or rows == 0 or count == 0:
        loss.zero_()
        return (Q, E, torch.ones(W1.shape, dtype=torch.bool, device=dev), loss, *grids)
    k_out = torch.empty(W1.shape, dtype=torch.int8, device=dev) if nm else Q  # Q: unused
    k_in = keep1.view(torch.uint8) if keep1 is not None else Q  # same strides, no copy
    scale, zero = grids if grids else (Q, Q)  # Q: unused
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
        scale,
        zero,
        rows,
        count,
        scale.shape[2] if grids else 1,
        quant.group_size if grids else 1,
        float(quant.maxq) if grids else 1.0,
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
        QUANT=quant is not None,
        FP8=bool(quant.fp8) if grids else False,
        SYM=bool(quant.sym) if grids else False,
        FIND=bool(quant.find) if grids else False,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return (Q, E, k_out.view(torch.bool) if nm else keep1, loss, *grids)


triton_obs_sweep_batched = triton_obs_sweep  # the former name of the batched launch

OPS = {"obs_sweep": (triton_obs_sweep, triton_obs_sweep_unsupported)}
BATCHED = frozenset({"obs_sweep"})  # takes W1 [E, rows, count] (grid: row tiles x layers)
QUANT = frozenset({"obs_sweep"})  # takes quant= (every format and grid)
