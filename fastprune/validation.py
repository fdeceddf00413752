"""Input checks shared by every public entry point: clear errors that name the argument."""

from __future__ import annotations

import fnmatch
import math
import numbers

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

# H must be symmetric to within HESSIAN_RTOL * max|H| (raised to 2 ulp for half-precision H):
# a Gram matrix accumulated in float32 is symmetric to ~1e-7 relative; the solvers read one
# triangle, so a larger gap means H is not what they assume.
HESSIAN_RTOL = 1e-4
SOLVE_DTYPES = (torch.float32, torch.float64)


def check_float_tensor(T: object, name: str) -> torch.Tensor:
    """A floating-point torch.Tensor (a `TypeError` naming `name` otherwise)."""
    if not isinstance(T, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(T).__name__}")
    if not T.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {T.dtype}")
    return T


def check_weight(W: object, name: str = "W") -> torch.Tensor:
    """A finite floating 2-D tensor."""
    check_float_tensor(W, name)
    if W.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, cols], got shape {tuple(W.shape)}")
    if W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(W.shape)}")
    check_finite(W, name)
    return W


def check_real_data(T: torch.Tensor, name: str) -> None:
    """Reject meta tensors (no data) and complex ones."""
    if T.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without data): load it first")
    if T.is_complex():
        raise TypeError(f"{name} must be real, got dtype {T.dtype}")


def non_finite_error(T: torch.Tensor, name: str) -> ValueError:
    """The error for a tensor known to hold NaN/inf (counts them)."""
    bad = (~torch.isfinite(T)).sum().item()
    return ValueError(f"{name} contains {bad} NaN/inf value(s)")


def all_finite(T: torch.Tensor) -> bool:
    """Whether `T` holds no NaN/inf, from its min and max (NaN propagates into both): one
    pass and no temporary the size of `T`."""
    if not T.is_floating_point() or T.numel() == 0:
        return True
    if T.element_size() == 1:  # float8 has no aminmax; float16 holds all its values
        T = T.to(torch.float16)
    lo, hi = torch.aminmax(T)
    return bool(torch.isfinite(torch.stack([lo, hi])).all())


def check_finite(T: torch.Tensor, name: str) -> None:
    """Reject meta tensors (no data) and NaN/inf instead of letting them propagate."""
    check_real_data(T, name)
    if not all_finite(T):
        raise non_finite_error(T, name)


def check_hessian(H: object, cols: int, device: torch.device, name: str = "H") -> torch.Tensor:
    """A square floating `[cols, cols]` tensor on `device` that passes `check_gram_like`."""
    check_float_tensor(H, name)
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{name} must be square [cols, cols], got shape {tuple(H.shape)}")
    if H.shape[0] != cols:
        raise ValueError(f"{name} is {tuple(H.shape)} but W has {cols} columns")
    check_device(H, device, name)
    if H.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without data): load it first")
    check_gram_like(H, name)  # also rejects NaN/inf
    return H


def check_hessian_diagonal(
    H: object, cols: int, device: torch.device, name: str = "H"
) -> torch.Tensor:
    """`diag(H)` given in place of H: a floating `[cols]` tensor on `device`, finite and
    non-negative."""
    check_float_tensor(H, name)
    if H.shape != (cols,):
        raise ValueError(
            f"{name} (the diagonal of H) must have W's {cols} columns, got {tuple(H.shape)}"
        )
    check_device(H, device, name)
    check_finite(H, name)
    if (H < 0).any():
        i = int((H < 0).nonzero()[0, 0])
        raise ValueError(f"{name}: diag(H) must be non-negative, got {H[i].item():g} at {i}")
    return H


def hessian_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of `check_gram_like` for an H of `dtype`."""
    return max(HESSIAN_RTOL, 2 * torch.finfo(dtype).eps)


def check_gram_like(H: torch.Tensor, name: str = "H") -> None:
    """Cheap necessary conditions for a finite positive semi-definite `H`, no factorisation:
    a non-negative diagonal, `|H_ij - H_ji| <= tol * max|H|` and `|H_ij| <= sqrt(H_ii H_jj)
    + tol * max|H|` (2x2 principal minors >= 0), `tol = hessian_tolerance(H.dtype)`. One
    pass over square blocks of the upper triangle; H can still fail a Cholesky later."""
    diag = torch.diagonal(H)
    neg = diag < 0
    if neg.any():
        i = int(neg.nonzero()[0, 0])
        raise ValueError(
            f"{name} is not positive semi-definite: {name}[{i},{i}] = {diag[i].item():g} < 0"
        )
    dtype = H.dtype if H.dtype in SOLVE_DTYPES else torch.float32
    root = diag.to(dtype).sqrt()
    cols = H.shape[0]
    b = 512 if H.device.type == "cpu" else 2048  # cache-sized blocks; few launches on a GPU
    peak, asym, minor = [], [], []
    for i in range(0, cols, b):
        for j in range(i, cols, b):
            A = H[i : i + b, j : j + b].to(dtype)
            absA = A.abs()
            peak.append(absA.amax())
            asym.append((A - H[j : j + b, i : i + b].t().to(dtype)).abs_().amax())
            minor.append((absA - root[i : i + b, None] * root[None, j : j + b]).amax())
    scale, worst_asym, worst_minor = (torch.stack(v).amax().item() for v in (peak, asym, minor))
    if not all(math.isfinite(v) for v in (scale, worst_asym, worst_minor)):
        check_finite(H, name)  # NaN/inf somewhere: raises, naming H
    tol = hessian_tolerance(H.dtype) * scale
    if worst_asym > tol:
        raise ValueError(
            f"{name} is not symmetric: max|{name} - {name}^T| = {worst_asym:g} exceeds "
            f"{hessian_tolerance(H.dtype):g} * max|{name}|"
        )
    if worst_minor > tol:
        raise ValueError(
            f"{name} is not positive semi-definite: an off-diagonal |{name}[i,j]| exceeds "
            f"sqrt({name}[i,i] * {name}[j,j]) by {worst_minor:g}"
        )


def check_device(T: torch.Tensor, device: torch.device, name: str) -> None:
    if T.device != device:
        raise ValueError(f"{name} is on {T.device} but W is on {device}; put them on one device")


def check_sparsity(sparsity: object, name: str = "sparsity") -> float:
    """A real number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not math.isfinite(s) or not 0.0 <= s < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return s


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True/False), got {value!r}")
    return value


def check_rows(rows: object, inplace: bool = False) -> slice | None:
    """None, or a slice of W's rows to solve (`rows=`); not together with `inplace`."""
    if rows is not None and (not isinstance(rows, slice) or inplace):
        raise ValueError(f"rows must be a slice of W's rows (and inplace=False), got {rows!r}")
    return rows


def check_inplace(inplace: object, W: torch.Tensor) -> bool:
    """A bool; `True` needs a W whose entries own distinct memory (not expanded)."""
    check_bool(inplace, "inplace")
    if inplace and any(st == 0 and sz > 1 for st, sz in zip(W.stride(), W.shape)):
        raise ValueError(
            "inplace=True but W is expanded (a stride-0 view: its entries share memory); "
            "pass W.contiguous() or inplace=False"
        )
    return inplace


def check_solve_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """torch.float32 or torch.float64: the dtypes the factorisations run in."""
    if dtype not in SOLVE_DTYPES:
        raise TypeError(f"{name} must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype  # type: ignore[return-value]


def check_int(value: object, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_pattern(prune_n: object, prune_m: object, cols: int) -> tuple[int, int]:
    """Validate an N:M pattern; `(0, 0)` (or `prune_n == 0`) means unstructured."""
    n = check_int(prune_n, "prune_n")
    m = check_int(prune_m, "prune_m")
    if n == 0:
        return 0, 0
    if m == 0:
        raise ValueError(f"prune_m must be > 0 when prune_n={n} (N:M pattern)")
    if n >= m:
        raise ValueError(f"prune_n must be < prune_m for an N:M pattern, got {n}:{m}")
    if cols % m != 0:
        raise ValueError(f"prune_m={m} does not divide the {cols} columns of W")
    return n, m


def check_percdamp(percdamp: object) -> float:
    if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real):
        raise TypeError(f"percdamp must be a number, got {percdamp!r}")
    p = float(percdamp)
    if not math.isfinite(p) or p < 0:
        raise ValueError(f"percdamp must be finite and >= 0, got {percdamp!r}")
    return p


def check_mask(mask: object, shape: torch.Size, device: torch.device, name: str = "mask"):
    """A bool `[rows, cols]` keep-mask (True = kept) on W's device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = kept), got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but W has {tuple(shape)}")
    check_device(mask, device, name)
    return mask


def check_scaler(
    scaler: object, cols: int, device: torch.device, name: str = "scaler_row"
) -> torch.Tensor:
    """A finite non-negative `[cols]` vector of squared input norms on W's device."""
    if not isinstance(scaler, torch.Tensor) or not scaler.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if scaler.numel() != cols:
        raise ValueError(f"{name} has {scaler.numel()} entries, W has {cols} columns")
    check_device(scaler, device, name)
    check_finite(scaler, name)
    if (scaler < 0).any():
        raise ValueError(f"{name} must be non-negative (squared input norms)")
    return scaler.reshape(-1)


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Solve in float64 if any input is float64, else float32 (never in half precision)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_patterns(value, name: str) -> list[str] | None:
    """`targets` / `ignore` as a list of glob patterns (None when not given)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a string or a list of strings (glob patterns)")
    if not value:
        raise ValueError(f"{name} is empty")
    return list(value)


def matches(pats: list[str], rel: str) -> bool:
    """A glob pattern matches a name relative to the block (`mlp.experts.down_proj`) or its
    last part (`down_proj`)."""
    leaf = rel.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(leaf, p) for p in pats)
