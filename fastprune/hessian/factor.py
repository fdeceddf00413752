"""The upper Cholesky factor of `(H + damp I)^-1`, two ways: one Cholesky of the flipped
matrix and a triangular inverse (the default), or the SparseGPT reference's three steps."""

from __future__ import annotations

import torch

INVERSE_METHODS = ("direct", "reference")


def upper_triangular_inverse(R: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """`R^-1` of an upper triangular `R` (itself upper triangular), by halves:
    `[[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]`, the corner by two triangular
    solves (`A^-1 B`, then `(.) C^-1`) and the diagonal blocks recursively; blocks of at most
    `leaf` columns are solved against the identity. ~n^3/3 flops, as LAPACK's trtri. `R` may
    carry leading batch dimensions (`[..., n, n]`: every matrix inverted alike)."""
    n = R.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=R.dtype, device=R.device).expand_as(R)
        return torch.linalg.solve_triangular(R, eye, upper=True)
    h = n // 2
    out = torch.zeros_like(R)
    A, B, C = R[..., :h, :h], R[..., :h, h:], R[..., h:, h:]
    X = torch.linalg.solve_triangular(A, B, upper=True)  # A^-1 B
    out[..., :h, h:] = torch.linalg.solve_triangular(C, X, upper=True, left=False).neg_()
    del X
    out[..., :h, :h] = upper_triangular_inverse(A, leaf)
    out[..., h:, h:] = upper_triangular_inverse(C, leaf)
    return out


def _upper_factor_direct(Hd: torch.Tensor, damp: float) -> torch.Tensor | None:
    """`U = R^-1` with `R = J L' J`, `L'` the lower Cholesky factor of `J A J` (`J` the
    flip, `A = Hd + damp I`): `A = R R^T` with `R` upper, so `A^-1 = R^-T R^-1 = U^T U`.
    One Cholesky and one triangular inverse (~2/3 n^3 flops). None if `A` does not factor."""
    A = torch.flip(Hd, (0, 1))  # a copy; the flip keeps the diagonal on the diagonal
    A.diagonal().add_(damp)
    L, info = torch.linalg.cholesky_ex(A)
    del A
    if info.item() != 0:
        return None
    R = torch.flip(L, (0, 1))
    del L
    return upper_triangular_inverse(R)


def _upper_factor_reference(Hd: torch.Tensor, damp: float) -> torch.Tensor | None:
    """The SparseGPT reference's `U = chol_upper(cholesky_inverse(chol(A)))`, `A = Hd + damp I`
    (~4/3 n^3 flops: two Cholesky factorisations and an inverse from one). None on failure."""
    A = Hd.clone()
    idx = torch.arange(A.shape[0], device=A.device)
    A[idx, idx] += damp
    L, info = torch.linalg.cholesky_ex(A)
    if info.item() != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return None if info.item() != 0 else U


def upper_factor(Hd: torch.Tensor, damp: float, method: str = "direct") -> torch.Tensor | None:
    """The upper `U` with `(Hd + damp I)^-1 = U^T U` by `method` (one of `INVERSE_METHODS`),
    or None when `Hd + damp I` does not factor."""
    factor = _upper_factor_direct if method == "direct" else _upper_factor_reference
    return factor(Hd, damp)


__all__ = ["INVERSE_METHODS", "upper_factor", "upper_triangular_inverse"]
