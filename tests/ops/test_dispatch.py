"""Dispatch (`fastprune.ops.dispatch`): which backend resolves, what `Kernels` runs, and
that it records it truthfully: `info()["kernels"]` names what ran each op and
`info()["kernel_fallbacks"]` why a named backend was passed over. Each backend's limits
(its `unsupported`) refuse what the kernel cannot take, and the call then runs on the next
implementation of the chain (cuda -> triton -> torch), whose output is checked against the
op's oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import CUDA_PROBLEM, TRITON_PROBLEM, backend_params
from op_oracles import (
    CHECKS,
    oracle_block_prune_mask,
    random_keep,
    swap_state,
    sweep_block,
)

import fastprune as fp
from fastprune import ops
from fastprune.ops import ColumnLosses, Kernels, ObsSweep, SwapSearch

CPU = torch.device("cpu")
FAST = backend_params(fast_only=True)
ALL = backend_params()


# ------------------------------------------------------------------------- resolution


def test_resolve_backend(monkeypatch):
    assert ops.resolve_backend("auto", CPU, ("obs_sweep",)) == "torch"
    assert ops.resolve_backend("torch", CPU, ("obs_sweep",)) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTPRUNE_CUDA_EMULATE", raising=False)
    with pytest.raises(ops.BackendUnavailableError, match="triton"):
        ops.resolve_backend("triton", CPU, ("obs_sweep",))
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.resolve_backend("cuda", CPU, ("obs_sweep",))
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("tpu", CPU, ("obs_sweep",))
    with pytest.raises(ValueError, match="unknown op"):
        ops.resolve_backend("triton", CPU, ("no_such_op",))
    with pytest.raises(ValueError, match="unknown op"):
        ops.get_op("no_such_op", "torch")


@pytest.mark.skipif(TRITON_PROBLEM is not None, reason=str(TRITON_PROBLEM))
@pytest.mark.skipif(CUDA_PROBLEM is not None, reason=str(CUDA_PROBLEM))
def test_get_op_is_the_backends_own():
    """get_op returns a backend's own implementation, torch's where it has none."""
    from fastprune import triton_kernels
    from fastprune.ops import cuda_ops

    for op in ops.OPS:
        assert ops.get_op(op, "torch") is ops.TORCH_OPS[op]
        assert ops.get_op(op, "triton") is triton_kernels.OPS[op][0]
        want = cuda_ops.OPS[op][0] if op in cuda_ops.OPS else ops.TORCH_OPS[op]
        assert ops.get_op(op, "cuda") is want
    assert set(cuda_ops.OPS) == {"obs_sweep", "swap_search"}


# ---------------------------------------------------------------- what Kernels records


def _args(op: str, gen, dtype=torch.float32):
    """Small valid inputs of `op` (CPU)."""
    if op == "obs_sweep":
        W1, Hinv1 = sweep_block(gen, 6, 32, "plain", dtype=dtype)
        Hinv1 = Hinv1.to(dtype)
        return (W1, Hinv1, oracle_block_prune_mask(W1, Hinv1.diagonal(), 0.5)[0], 0, 0)
    if op == "block_prune_mask":
        W1, Hinv1 = sweep_block(gen, 6, 32, "plain", dtype=dtype)
        return (W1, Hinv1.diagonal().to(dtype), 0.5)
    if op == "column_losses":
        S = torch.rand(6, 40, generator=gen, dtype=torch.float64).to(dtype)
        return (S, [(0, 32), (32, 40)], 0.5, 0, 0)
    w, keep, c, H = swap_state(gen, 6, 24, dtype=dtype)
    if op == "swap_search":
        return (w, keep, c, H, 0, 0)
    keep[:, 0], keep[:, 1] = True, False
    c = (w * ~keep) @ H
    return (w, keep, c, H, torch.tensor([4, 1]), torch.tensor([0, 0]), torch.tensor([1, 1]))


def _to(args, dev):
    return tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)


def _expected(backend: str, op: str) -> str:
    """The implementation a backend's chain runs for an op it takes."""
    if backend == "cuda" and op not in ("obs_sweep", "swap_search"):
        return "triton"
    return backend


def _same(a, b):
    if a is None or isinstance(a, torch.Tensor):
        return a is b or torch.equal(a, b)
    return all(_same(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("op", ops.OPS)
def test_kernels_runs_and_records(backend, gen, op):
    """Inputs every implementation takes: the backend's own kernel runs (Triton's for the
    ops the CUDA backend has none of), is recorded with no fallback, and its plain tuple
    comes back as the op's typed result, equal to calling the kernel directly."""
    args = _to(_args(op, gen), backend.device)
    k = Kernels(backend.name, backend.device, (op,))
    assert k.backend == backend.name
    clone = op == "swap_apply"  # in place: run both on their own copies
    a1 = tuple(x.clone() if clone and isinstance(x, torch.Tensor) else x for x in args)
    out = k(op, *a1)
    assert k.info() == {"kernels": {op: _expected(backend.name, op)}}
    typed = {"obs_sweep": ObsSweep, "column_losses": ColumnLosses, "swap_search": SwapSearch}
    if op in typed:
        assert isinstance(out, typed[op])
    a2 = tuple(x.clone() if clone and isinstance(x, torch.Tensor) else x for x in args)
    direct = ops.get_op(op, _expected(backend.name, op))(*a2)
    assert _same(out, direct) and (not clone or (_same(a1[1], a2[1]) and _same(a1[2], a2[2])))


# ------------------------------------------------------------------------------ limits


@dataclass
class Limit:
    backend: str  # the backend named
    op: str
    make: Callable  # gen -> args (CPU)
    reason: str  # in the refusal
    ran: str  # what the chain runs instead
    check: bool = True  # the fallback's output against the oracle (not for half inputs,
    # which torch computes in their own dtype; the solvers pass float32/float64 only)

    def __str__(self):
        form = "-batched" if self.make.__name__ == "batched" else ""
        return f"{self.backend}-{self.op}-{self.reason.split()[0]}{form}"


def _sweep_nm(gen, count, n, m):
    W1, Hinv1 = sweep_block(gen, 5, count, "plain")
    return (W1, Hinv1, None, n, m)


def _sweep_f32_wide(gen):
    W1, Hinv1 = sweep_block(gen, 3, 260, "plain")
    return (W1, Hinv1, random_keep(gen, 3, 260), 0, 0)


def _swap_apply_strided_c(gen):
    w, keep, c, H, rows, u, p = _args("swap_apply", gen)
    return (w, keep, c.t().contiguous().t(), H, rows, u, p)


def _dtype(op, dtype):
    return lambda gen: _args(op, gen, dtype)


def _batch_of(make):
    """The batched form of `make`'s inputs: two layers (the second scaled), stacked."""

    def batched(gen):
        args = make(gen)
        return tuple(
            torch.stack([a, a * 2 if a.is_floating_point() and i == 0 else a])
            if isinstance(a, torch.Tensor)
            else a
            for i, a in enumerate(args)
        )

    return batched


F64, BF16 = torch.float64, torch.bfloat16
LIMITS = [
    Limit("cuda", "obs_sweep", _dtype("obs_sweep", F64), "float32 only", "triton"),
    Limit("cuda", "obs_sweep", _sweep_f32_wide, "at most 256 columns", "triton"),
    Limit("cuda", "obs_sweep", lambda g: _sweep_nm(g, 24, 1, 3), "M dividing 32", "triton"),
    Limit("cuda", "obs_sweep", lambda g: _sweep_nm(g, 36, 2, 12), "M dividing 32", "triton"),
    Limit("cuda", "obs_sweep", _batch_of(_dtype("obs_sweep", F64)), "float32 only", "triton"),
    Limit("cuda", "obs_sweep", _batch_of(_sweep_f32_wide), "at most 256 columns", "triton"),
    Limit("cuda", "swap_search", _dtype("swap_search", F64), "float32 only", "triton"),
    Limit("cuda", "column_losses", _dtype("column_losses", F64), "float32-only", "torch"),
    Limit("triton", "block_prune_mask", _dtype("block_prune_mask", F64), "float32-only", "torch"),
    Limit("triton", "column_losses", _dtype("column_losses", F64), "float32-only", "torch"),
    Limit("triton", "swap_search", _dtype("swap_search", BF16), "float32/", "torch", False),
    Limit("triton", "swap_apply", _swap_apply_strided_c, "unit column stride", "torch"),
]


def _limit_params():
    marks = {"triton": FAST[0].marks, "cuda": FAST[1].marks}
    return [pytest.param(lim, marks=marks[lim.backend], id=str(lim)) for lim in LIMITS]


@pytest.mark.parametrize("limit", _limit_params())
def test_limits_refuse_and_kernels_fall_back(limit, gen, monkeypatch):
    """The backend (or, for an op the CUDA backend has no kernel of, the Triton kernel its
    chain would run) refuses the inputs with the reason; Kernels runs the next implementation
    of the chain, records it and the reason, and that output passes the op's oracle."""
    if limit.backend == "cuda" and not torch.cuda.is_available():
        monkeypatch.setenv("FASTPRUNE_CUDA_EMULATE", "1")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = _to(limit.make(gen), dev)
    # the CUDA backend's chain goes on to Triton for the ops it has no kernel of
    refuser = limit.backend if limit.op in ops.backend_ops(limit.backend) else "triton"
    why = ops.backend_ops(refuser)[limit.op][1](*args)
    assert why is not None and limit.reason in why, why
    k = Kernels(limit.backend, dev, (limit.op,))
    state = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = k(limit.op, *args)
    info = k.info()
    assert info["kernels"] == {limit.op: limit.ran}, info
    assert info["kernel_fallbacks"] == {limit.op: f"{refuser}: {why}"}, info
    if not limit.check:
        return
    if limit.op == "swap_apply":
        from op_oracles import check_swap_apply

        check_swap_apply(args[1], args[2], *state)
    else:
        CHECKS[limit.op](out, *state)


def test_backends_declare_their_batched_forms():
    """The backend names are declared once (`fastprune.validation.BACKENDS`); torch takes
    every op's batched form; a fast backend's `BATCHED` names only ops it has that have one."""
    from fastprune import validation

    assert ops.BACKENDS is validation.BACKENDS
    assert ops.backend_batched("torch") == set(ops.BATCH_RANK) <= set(ops.OPS)
    for name, problem in (("triton", TRITON_PROBLEM), ("cuda", CUDA_PROBLEM)):
        if problem is None:
            batched = ops.backend_batched(name)
            assert "obs_sweep" in batched
            assert batched <= set(ops.backend_ops(name)) & set(ops.BATCH_RANK)


@pytest.mark.skipif(TRITON_PROBLEM is not None, reason=str(TRITON_PROBLEM))
@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter on CPU tensors")
def test_batched_call_passes_over_a_backend_without_the_form(gen):
    """Triton's `block_prune_mask` takes one layer only: a batched call runs torch's,
    recorded with the reason, and passes the oracle layer by layer; a one-layer call on the
    same `Kernels` still runs Triton's."""
    assert "block_prune_mask" not in ops.backend_batched("triton")
    args = _args("block_prune_mask", gen)
    k = Kernels("triton", CPU, ("block_prune_mask",))
    batched = (torch.stack([args[0], args[0] * 3]), torch.stack([args[1], args[1]]), args[2])
    CHECKS["block_prune_mask"](k("block_prune_mask", *batched), *batched)
    assert k.info()["kernels"] == {"block_prune_mask": "torch"}
    assert k.info()["kernel_fallbacks"] == {"block_prune_mask": "triton: no batched form"}
    k("block_prune_mask", *args)
    assert k.info()["kernels"] == {"block_prune_mask": "torch+triton"}


@pytest.mark.skipif(CUDA_PROBLEM is not None, reason=str(CUDA_PROBLEM))
def test_cuda_swap_search_column_limit():
    """The CUDA search indexes columns in 16 bits (checked on meta tensors: no memory)."""
    from fastprune.ops.cuda_ops import cuda_swap_search_unsupported

    w = torch.empty(2, 65536, device="meta")
    H = torch.empty(65536, 65536, device="meta")
    keep = torch.empty(2, 65536, dtype=torch.bool, device="meta")
    assert "at most 65535 columns" in cuda_swap_search_unsupported(w, keep, w, H)
    w = torch.empty(2, 65535, device="meta")
    assert cuda_swap_search_unsupported(w, keep[:, :-1], w, H[:-1, :-1]) is None


@pytest.mark.parametrize("backend", FAST[1:], indirect=True)
def test_kernels_records_each_implementation_used(backend, gen):
    """Calls of one op that different implementations took: 'cuda+triton' in order of first
    use, and the reason the CUDA kernel was passed over."""
    k = Kernels("cuda", backend.device, ("obs_sweep",))
    k("obs_sweep", *_to(_args("obs_sweep", gen), backend.device))
    k("obs_sweep", *_to(_args("obs_sweep", gen, torch.float64), backend.device))
    k("obs_sweep", *_to(_args("obs_sweep", gen), backend.device))
    info = k.info()
    assert info["kernels"] == {"obs_sweep": "cuda+triton"}
    assert info["kernel_fallbacks"]["obs_sweep"].startswith("cuda: float32 only")


def test_named_backend_that_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("FASTPRUNE_CUDA_EMULATE", raising=False)
    W, H, _ = fp.testing.random_layer(4, 32)
    with pytest.raises(fp.BackendUnavailableError, match="CUDA"):
        fp.sparsegpt_layer(W, H, backend="cuda")
    with pytest.raises(fp.BackendUnavailableError, match="CUDA"):
        fp.sparseswaps_layer(W, H, backend="cuda")
    from fastprune.ops.cuda_ops import cuda_swap_search

    keep = torch.ones_like(W, dtype=torch.bool)
    with pytest.raises(ValueError, match="FASTPRUNE_CUDA_EMULATE"):
        cuda_swap_search(W, keep, W, H)


# ------------------------------------------------------------------ solvers' r.info


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_solvers_report_what_ran(backend, gen):
    """r.info['kernels'] of each solver names the implementation of every op it ran."""
    W, H = fp.testing.random_layer(8, 64, columnar=True, generator=gen)[:2]
    W, H = W.to(backend.device), H.to(backend.device)
    b = backend.name
    r = fp.sparsegpt_layer(W, H, blocksize=32, backend=b)
    assert r.info["kernels"] == {"block_prune_mask": _expected(b, "block_prune_mask"),
                                 "obs_sweep": b}  # fmt: skip
    assert "kernel_fallbacks" not in r.info
    r = fp.sparsegpt_layer(W, H, prune_n=2, prune_m=4, blocksize=32, backend=b)
    assert r.info["kernels"] == {"obs_sweep": b}
    r = fp.rose_layer(W, H, blocksize=32, backend=b, range_threshold=0.0)
    assert r.info["kernels"] == {
        "column_losses": _expected(b, "column_losses"),
        "block_prune_mask": _expected(b, "block_prune_mask"),
        "obs_sweep": b,
    }
    r = fp.sparseswaps_layer(W, H, backend=b, max_swaps=3, reconstruct=True)
    # the reconstruction sweeps the final mask as a fixed mask: no block_prune_mask
    assert r.info["kernels"] == {
        "swap_search": b,
        "swap_apply": _expected(b, "swap_apply"),
        "obs_sweep": b,
    }
    assert "kernel_fallbacks" not in r.info


@pytest.mark.parametrize("backend", FAST, indirect=True)
def test_solvers_report_fallbacks(backend, gen):
    """float64 layers: Triton's radix selection refuses them (torch runs block_prune_mask and
    column_losses), the CUDA sweep refuses them (Triton's runs); blocks wider than 256
    columns pass the CUDA sweep over to Triton."""
    W, H = fp.testing.random_layer(6, 64, columnar=True, generator=gen)[:2]
    W64, H64 = W.double().to(backend.device), H.double().to(backend.device)
    b = backend.name
    r = fp.rose_layer(W64, H64, blocksize=32, backend=b, range_threshold=0.0)
    assert r.info["kernels"] == {
        "column_losses": "torch",
        "block_prune_mask": "torch",
        "obs_sweep": "triton",
    }
    fb = r.info["kernel_fallbacks"]
    assert fb["column_losses"].startswith("triton: the radix selection is float32-only")
    assert fb["block_prune_mask"].startswith("triton: the radix selection is float32-only")
    if b == "cuda":
        assert fb["obs_sweep"].startswith("cuda: float32 only")
        W, H = fp.testing.random_layer(4, 300, generator=gen)[:2]
        r = fp.sparsegpt_layer(W.to(backend.device), H.to(backend.device), blocksize=512,
                               prune_n=2, prune_m=4, backend=b)  # fmt: skip
        assert r.info["kernels"] == {"obs_sweep": "triton"}
        assert r.info["kernel_fallbacks"] == {
            "obs_sweep": "cuda: blocks of at most 256 columns, got 300"
        }
    else:
        assert set(fb) == {"column_losses", "block_prune_mask"}
