"""Test setup shared by every test file.

- Triton kernels run through the interpreter when there is no GPU (TRITON_INTERPRET=1).
- Random inputs, replayed by default: the `gen` fixture seeds a generator per test (and
  torch's global generator with the same seed) from the test's own id, so every run draws the
  same inputs. `FASTPRUNE_TEST_SEED=random` draws fresh ones per test instead;
  `FASTPRUNE_TEST_SEED=<seed>` gives every test that one seed. The seed is printed in the
  captured output and in a "fastprune seed" section of every failure report, e.g.
  `FASTPRUNE_TEST_SEED=1234 pytest 'tests/ops/test_obs_sweep.py::test_x[..]'` replays it.
- `FASTPRUNE_REQUIRE=<pkg>[,<pkg>]`: a test skipped for want of one of these packages
  (`pytest.importorskip`) fails instead (CI's llm-compressor venv, scripts/setup_llmc.sh).
- `backend`: the op backends a test is parametrized over (`backend_params(op)`): "torch"
  everywhere, "triton" (the interpreter on CPU), "cuda" for ops with a hand-written CUDA
  kernel (on a GPU, else the CPU emulator of the same sources, FASTPRUNE_CUDA_EMULATE=1).
- One table of tolerances (docs/semantics.md, Exactness) for every backend-vs-oracle
  comparison, and helpers that say where two tensors disagree instead of a bare 'not close'.
"""

from __future__ import annotations

import os
import shutil
import zlib
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    # must be set before triton.jit decorates anything
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SEED_ENV = "FASTPRUNE_TEST_SEED"
HAS_GPU = torch.cuda.is_available()

# ------------------------------------------------------------------------------ tolerances

OP_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
"""Per-op outputs against the float64 oracle, relative to the output's scale (max |oracle|),
keyed by the dtype the op computes in (float32 for float32/float16/bfloat16 inputs). For
swap_search the scale is the magnitude of the row's Δ terms."""

NEAR_TIE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
"""A mask entry may differ from the float64 oracle's only where two scores are a near-tie:
within this fraction of the magnitude the scores were computed from (float32 rounding of
the updated weights)."""

MASK_AGREE = 0.999
"""Masks of a backend and the oracle (or of two backends' solves) agree on >= this fraction."""

LAYER_RTOL = 1e-5
"""Solver weights of a fast backend vs the torch backend (same dtype), relative error over
the rows whose masks agree (rows of an OBS solve are independent given their mask)."""

MODEL_RTOL = 1e-4
"""Pruned model weights of a fast backend vs the torch backend (relative error per linear)."""

HALF_ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
"""One unit of rounding (relative) of a half-precision output dtype."""


def state_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype an op computes in: float64 if an input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------------------- seeds


def pytest_report_header(config):
    seed = os.environ.get(SEED_ENV)
    if seed == "random":
        return (
            "fastprune: fresh random inputs per test; a failure shows its seed, "
            f"replay it with {SEED_ENV}=<seed>"
        )
    if seed:
        return f"fastprune: every test's random inputs from {SEED_ENV}={seed}"
    return f"fastprune: each test's inputs from a seed of its own id ({SEED_ENV}=random: fresh)"


def _test_seed(nodeid: str) -> int:
    """A test's default seed: stable across runs and machines (not Python's salted hash)."""
    return zlib.crc32(nodeid.encode())


_SEED_KEY = pytest.StashKey[int]()


@pytest.fixture
def seed(request) -> int:
    """This test's seed: `FASTPRUNE_TEST_SEED` if it is a number, a fresh random one if it
    is "random", else one derived from the test's id (the same every run)."""
    env = os.environ.get(SEED_ENV)
    if env == "random":
        value = int.from_bytes(os.urandom(4), "little")
    elif env:
        value = int(env)
    else:
        value = _test_seed(request.node.nodeid)
    request.node.stash[_SEED_KEY] = value
    request.node.user_properties.append(("seed", value))
    print(f"seed={value} (replay: {SEED_ENV}={value})")
    torch.manual_seed(value)
    return value


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A generator seeded by `seed` (see `seed`)."""
    return torch.Generator().manual_seed(seed)


REQUIRE_ENV = "FASTPRUNE_REQUIRE"
"""Comma-separated packages a run must have (e.g. `FASTPRUNE_REQUIRE=llmcompressor` in CI's
llm-compressor venv): a test skipped because one of them does not import fails instead."""


def _required_but_missing(report) -> str | None:
    wanted = [p.strip() for p in os.environ.get(REQUIRE_ENV, "").split(",") if p.strip()]
    if not wanted or not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    reason = str(report.longrepr[2])
    return next((p for p in wanted if f"import '{p}'" in reason), None)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    missing = _required_but_missing(report)
    if missing:  # a module-level importorskip
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_ENV} names {missing!r}, but: {report.longrepr[2]}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    missing = _required_but_missing(report)
    if missing:
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_ENV} names {missing!r}, but: {report.longrepr[2]}"
    if report.failed and _SEED_KEY in item.stash:
        s = item.stash[_SEED_KEY]
        report.sections.append(
            ("fastprune seed", f"seed={s}; replay: {SEED_ENV}={s} pytest '{item.nodeid}'")
        )


# ------------------------------------------------------------------------------- backends


def _triton_problem() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs a CUDA GPU or TRITON_INTERPRET=1"
    return None


def _cuda_problem() -> str | None:
    if HAS_GPU:
        return None
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which("c++") is None or not is_ninja_available():
        return "no GPU, and no C++ compiler/ninja for the CUDA emulator"
    return None


TRITON_PROBLEM = _triton_problem()
CUDA_PROBLEM = _cuda_problem()


def cuda_kernel_ops() -> tuple[str, ...]:
    """Ops with a hand-written CUDA kernel (the others have no "cuda" parameter)."""
    from fastprune.ops.cuda_ops import OPS

    return tuple(OPS)


def backend_params(op: str | None = None, fast_only: bool = False) -> list:
    """pytest params over the backends that implement `op` themselves (all if None),
    skipped where the backend cannot run here; use with `indirect=True` (the `backend`
    fixture)."""
    params = [] if fast_only else [pytest.param("torch", id="torch")]
    params.append(
        pytest.param(
            "triton",
            id="triton",
            marks=pytest.mark.skipif(TRITON_PROBLEM is not None, reason=str(TRITON_PROBLEM)),
        )
    )
    if op is None or op in cuda_kernel_ops():
        params.append(
            pytest.param(
                "cuda",
                id="cuda",
                marks=pytest.mark.skipif(CUDA_PROBLEM is not None, reason=str(CUDA_PROBLEM)),
            )
        )
    return params


@dataclass(frozen=True)
class Backend:
    """A backend as a test runs it: its name, the device its tensors go to, and whether the
    CUDA kernels run on the CPU emulator (slow: keep shapes small there)."""

    name: str
    device: torch.device
    emulated: bool = False

    def op(self, op: str):
        """The backend's own implementation of `op` (never a fallback)."""
        from fastprune.ops import TORCH_OPS, backend_ops

        if self.name == "torch":
            return TORCH_OPS[op]
        table = backend_ops(self.name)
        assert op in table, f"backend {self.name!r} has no kernel for {op!r}"
        return table[op][0]

    def unsupported(self, op: str):
        from fastprune.ops import backend_ops

        return backend_ops(self.name)[op][1]


@pytest.fixture
def backend(request, monkeypatch) -> Backend:
    """The backend named by the test's `backend` parameter (see `backend_params`)."""
    name = request.param
    device = torch.device("cuda" if HAS_GPU else "cpu")
    emulated = name == "cuda" and not HAS_GPU
    if emulated:
        monkeypatch.setenv("FASTPRUNE_CUDA_EMULATE", "1")
    return Backend(name, device, emulated)


@pytest.fixture
def shadow(monkeypatch):
    """Check every call of the mask ops (and column_losses) that any `Kernels` runs against
    the op's float64 oracle (tests/op_oracles.py) on the same inputs, before the solve goes
    on: each mask entry that differs from the oracle's is a near-tie where it was made.
    Counts the calls checked."""
    from op_oracles import CHECKS

    from fastprune.ops import Kernels

    checked: dict[str, int] = {}
    run = Kernels.__call__

    def checked_call(self, op, *args, **kwargs):
        out = run(self, op, *args, **kwargs)
        if op in ("obs_sweep", "block_prune_mask", "column_losses"):
            what = f"{op} call {checked.get(op, 0)} ({'+'.join(self.ran[op])})"
            CHECKS[op](out, *args, **kwargs, what=what)
            checked[op] = checked.get(op, 0) + 1
        return out

    monkeypatch.setattr(Kernels, "__call__", checked_call)
    return checked


@pytest.fixture
def column_losses_seen(shadow, monkeypatch):
    """The column and block losses of each `column_losses` call, in order (a ROSE solve's
    column order comes from its own)."""
    from fastprune.ops import Kernels

    seen = []
    run = Kernels.__call__

    def call(self, op, *args, **kwargs):
        out = run(self, op, *args, **kwargs)
        if op == "column_losses":
            seen.append(tuple(t.detach().cpu() for t in out))
        return out

    monkeypatch.setattr(Kernels, "__call__", call)
    return seen


@pytest.fixture
def swaps_checked(monkeypatch):
    """Check every `swap_search` call of any `Kernels` against the exhaustive float64
    search on the same inputs (`op_oracles.check_swap_search`: the Δ is the minimum up to
    rounding, the pair achieves it, ties either way) before the run goes on; counts the
    calls. A run whose path a near-tie turned elsewhere is still checked at every step."""
    from op_oracles import check_swap_search

    from fastprune.ops import Kernels

    checked = {"swap_search": 0}
    run = Kernels.__call__

    def call(self, op, *args, **kwargs):
        out = run(self, op, *args, **kwargs)
        if op == "swap_search":
            what = f"swap_search call {checked['swap_search']} ({'+'.join(self.ran[op])})"
            check_swap_search(out, *args, **kwargs, what=what)
            checked["swap_search"] += 1
        return out

    monkeypatch.setattr(Kernels, "__call__", call)
    return checked


# -------------------------------------------------------------------------- comparisons


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


def assert_close_to_scale(actual, expected, rtol: float, what: str = "") -> None:
    """Entries within `rtol` relative, or `rtol` of the tensor's scale (max |expected|):
    the per-op rule (docs/semantics.md, Exactness: outputs within 1e-5)."""
    atol = rtol * expected.detach().abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=atol, what=what)


def assert_masks_agree(
    actual: torch.Tensor, expected: torch.Tensor, min_agree: float = 1.0, what: str = "mask"
) -> None:
    """Masks agree on at least `min_agree` of entries (1.0 = exactly)."""
    assert actual.shape == expected.shape
    agree = (actual.cpu() == expected.cpu()).float().mean().item()
    assert agree >= min_agree, f"{what}: agree {agree:.6f} < {min_agree}; " + describe_mismatch(
        actual, expected, 0, 0
    )


def assert_weights_agree_where_masks_do(
    wa, wb, ma, mb, rtol: float, min_rows: float = 0.0, what: str = "weight"
) -> torch.Tensor:
    """Two solves' weights within `rtol` (relative error) on the rows whose masks agree
    entirely (rows of an OBS solve are independent given their mask), so that a mask flip
    never skips the weight comparison; at least `min_rows` of the rows must agree. Returns
    the rows compared."""
    rows = (ma.cpu() == mb.cpu()).all(1)
    assert rows.float().mean().item() >= min_rows, f"{what}: {int((~rows).sum())} rows differ"
    err = relative_error(wa.detach().cpu()[rows], wb.detach().cpu()[rows])
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol} on rows whose masks agree"
    return rows


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
