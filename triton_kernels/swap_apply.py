"""Triton `swap_apply` (contract: `fastprune.ops.swap_apply`).

`_swap_apply_kernel`: grid `(swaps, column tiles of BLOCK_N)`: `c[r] += w_u H[u, :] - w_p H[p, :]`
(H is symmetric, so rows of `H` are read) and the program of the first column tile flips
`keep[r, u] = False`, `keep[r, p] = True`. One launch for all swapping rows. `keep` (bool,
through a uint8 view) and `c` are updated in place, so they must have a unit column stride and
`c` must have `w`'s dtype; otherwise the dispatcher runs the torch reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _swap_apply_kernel(
    W_ptr,
    K_ptr,
    C_ptr,
    H_ptr,
    ROW_ptr,
    U_ptr,
    P_ptr,
    n_cols,
    stride_wm,
    stride_km,
    stride_cm,
    stride_hm,
    BLOCK_N: tl.constexpr,
):
    """Swap i: `c[r] += w[r, u] * H[u, :] - w[r, p] * H[p, :]`; keep[r, u] = 0, keep[r, p] = 1."""
    i = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = tl.load(ROW_ptr + i).to(tl.int64)
    u = tl.load(U_ptr + i).to(tl.int64)
    p = tl.load(P_ptr + i).to(tl.int64)
    wu = tl.load(W_ptr + r * stride_wm + u)
    wp = tl.load(W_ptr + r * stride_wm + p)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs < n_cols
    hu = tl.load(H_ptr + u * stride_hm + offs, mask=nmask, other=0.0)
    hp = tl.load(H_ptr + p * stride_hm + offs, mask=nmask, other=0.0)
    c_ptrs = C_ptr + r * stride_cm + offs
    c = tl.load(c_ptrs, mask=nmask, other=0.0)
    tl.store(c_ptrs, c + (wu * hu - wp * hp), mask=nmask)
    if pid_n == 0:
        tl.store(K_ptr + r * stride_km + u, tl.full([], 0, tl.uint8))
        tl.store(K_ptr + r * stride_km + p, tl.full([], 1, tl.uint8))


# ----------------------------------------------------------------------------- launcher


def triton_swap_apply_unsupported(w, keep, c, H, rows, u, p, **_tuning):
    if w.dtype not in (torch.float32, torch.float64):
        return f"float32/float64 only, got {w.dtype}"
    if c.dtype != w.dtype:
        return f"c must have w's dtype ({w.dtype}), got {c.dtype}"
    if c.stride(-1) != 1 or keep.stride(-1) != 1:
        return "c and keep are updated in place and need a unit column stride"
    return None


def triton_swap_apply(
    w: torch.Tensor,
    keep: torch.Tensor,
    c: torch.Tensor,
    H: torch.Tensor,
    rows: torch.Tensor,
    u: torch.Tensor,
    p: torch.Tensor,
    block_n: int | None = None,
) -> None:
    """In place, one launch for all swaps; `rows` must be distinct."""
    if rows.numel() == 0:
        return
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor, got {keep.dtype}")
    if c.dtype != w.dtype or c.stride(-1) != 1 or keep.stride(-1) != 1:
        raise ValueError("c must have w's dtype; c and keep must have unit column stride")
    if w.stride(-1) != 1:
        w = w.contiguous()
    H = H.to(w.dtype)
    if H.stride(-1) != 1:
        H = H.contiguous()
    cols = w.shape[1]
    keep8 = keep.view(torch.uint8)
    interp = os.environ.get("TRITON_INTERPRET") == "1"  # larger tiles under the interpreter
    bn = block_n or min(triton.next_power_of_2(cols), 4096 if interp else 1024)
    grid = (rows.numel(), triton.cdiv(cols, bn))
    _swap_apply_kernel[grid](
        w,
        keep8,
        c,
        H,
        rows.contiguous(),
        u.contiguous(),
        p.contiguous(),
        cols,
        w.stride(0),
        keep8.stride(0),
        c.stride(0),
        H.stride(0),
        BLOCK_N=bn,
        num_warps=4,
    )


OPS = {"swap_apply": (triton_swap_apply, triton_swap_apply_unsupported)}
