"""Test setup: Triton kernels run through the interpreter when there is no GPU, and a
helper that reports where two tensors disagree instead of a bare 'not close'."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # must be set before triton.jit decorates anything
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def describe_mismatch(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, limit: int = 5
) -> str:
    """Count and first indices of entries outside `atol + rtol*|expected|`."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.dtype == torch.bool or actual.dtype == torch.bool:
        bad = actual.cpu() != expected.cpu()
    else:
        bad = (a - e).abs() > atol + rtol * e.abs()
    idx = bad.nonzero()[:limit].tolist()
    return (
        f"{int(bad.sum())}/{bad.numel()} mismatched; first at {idx}; "
        f"values {[(a[tuple(i)].item(), e[tuple(i)].item()) for i in idx]}"
    )


def assert_close(actual, expected, rtol: float, atol: float = 0.0, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    ok = ((a - e).abs() <= atol + rtol * e.abs()).all()
    assert ok, f"{what}: " + describe_mismatch(actual, expected, rtol, atol)


def assert_masks_agree(
    actual: torch.Tensor, expected: torch.Tensor, min_agree: float = 1.0, what: str = "mask"
) -> None:
    """Masks agree on at least `min_agree` of entries (1.0 = exactly)."""
    assert actual.shape == expected.shape
    agree = (actual == expected).float().mean().item()
    assert agree >= min_agree, f"{what}: agree {agree:.6f} < {min_agree}; " + describe_mismatch(
        actual, expected, 0, 0
    )


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.fixture
def gen():
    """A fresh, differently seeded generator per test run (inputs are random every run);
    the seed is printed on failure through the test's captured output."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
