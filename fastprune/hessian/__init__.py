"""Calibration Hessians: their accumulation (`accumulate`, which documents the two
arithmetics of `HESSIAN_PRECISIONS`; `diagonal`), the exact rescaling of one out of range
(`scaling`), the inverse's factor with damping retries (`factor`, `inverse`) and the layer
losses they weigh (`loss`); every name is importable from here."""

from ..validation import check_finite
from .accumulate import (
    HESSIAN_KINDS,
    HESSIAN_PRECISIONS,
    HessianAccumulator,
    accumulate_hessian,
    running_hessian_update,
    uses_fast_hessian,
)
from .accumulate import (
    _check_batch as _check_batch,  # the asymmetric accumulator checks its batches alike
)
from .diagonal import (
    DiagonalAccumulator,
    RunningScaler,
    hessian_diagonal,
    running_scaler_update,
    scaler_update,
)
from .factor import (
    INVERSE_METHODS,
    upper_factor,
    upper_triangular_inverse,
)
from .inverse import (
    DEFAULT_PERCDAMP,
    INVERSE_PROBE_RTOL,
    InverseHessian,
    check_inverse_of,
    inverse_hessian,
)
from .loss import layer_loss, row_losses
from .scaling import H_RANGE, hessian_in_range, hessian_scale_exponent, scale_pow2

__all__ = [
    "DEFAULT_PERCDAMP",
    "HESSIAN_KINDS",
    "HESSIAN_PRECISIONS",
    "H_RANGE",
    "INVERSE_METHODS",
    "INVERSE_PROBE_RTOL",
    "DiagonalAccumulator",
    "HessianAccumulator",
    "InverseHessian",
    "RunningScaler",
    "accumulate_hessian",
    "check_finite",
    "check_inverse_of",
    "hessian_diagonal",
    "hessian_in_range",
    "hessian_scale_exponent",
    "inverse_hessian",
    "layer_loss",
    "row_losses",
    "running_hessian_update",
    "running_scaler_update",
    "scale_pow2",
    "scaler_update",
    "upper_factor",
    "upper_triangular_inverse",
    "uses_fast_hessian",
]
