"""backend='auto' on a GPU: the faster of Triton and CUDA, timed once per device and op set,
cached in memory and on disk. The device timing itself is stood in for here (it needs a
GPU); the choice, the cache and the fallbacks are what is tested."""

import json
import logging

import pytest
import torch

from fastprune.ops import autoselect, resolve_backend

DEV = torch.device("cuda", 0)


@pytest.fixture
def fake_timing(monkeypatch, tmp_path):
    """Per-backend milliseconds (a number, or an exception to raise) and a call log."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("FASTPRUNE_AUTO_BACKEND", raising=False)
    autoselect.fastest_backend.cache_clear()
    times: dict = {}
    calls: list = []

    def measure(backend, device, ops):
        calls.append((backend, ops))
        t = times[backend]
        if isinstance(t, Exception):
            raise t
        return t

    monkeypatch.setattr(autoselect, "measure_on_device", measure)
    yield times, calls
    autoselect.fastest_backend.cache_clear()


@pytest.mark.parametrize("triton_ms,cuda_ms,best", [(1.0, 2.0, "triton"), (3.0, 0.5, "cuda")])
def test_picks_the_faster_and_caches_it(fake_timing, triton_ms, cuda_ms, best):
    times, calls = fake_timing
    times.update(triton=triton_ms, cuda=cuda_ms)
    assert autoselect.fastest_backend("GPU X", DEV, ("obs_sweep",)) == best
    assert sorted(b for b, _ in calls) == ["cuda", "triton"]
    entry = json.loads(autoselect.cache_path().read_text())
    (key,) = entry
    assert "GPU X" in key and "obs_sweep" in key and "torch" in key
    assert entry[key]["backend"] == best
    assert entry[key]["median_ms"] == {"triton": triton_ms, "cuda": cuda_ms}
    # a new process (cleared memory cache) reads the disk cache and times nothing
    autoselect.fastest_backend.cache_clear()
    calls.clear()
    times.update(triton=cuda_ms, cuda=triton_ms)  # would flip the choice if re-measured
    assert autoselect.fastest_backend("GPU X", DEV, ("obs_sweep",)) == best
    assert calls == []
    # another device or op set is measured on its own
    assert autoselect.fastest_backend("GPU Y", DEV, ("obs_sweep",)) != best
    assert autoselect.fastest_backend("GPU X", DEV, ("swap_search",)) != best


def test_a_backend_that_fails_is_left_out(fake_timing, caplog):
    times, _ = fake_timing
    times.update(triton=5.0, cuda=RuntimeError("nvcc not found"))
    with caplog.at_level(logging.WARNING, logger="fastprune"):
        assert autoselect.fastest_backend("GPU X", DEV, ("swap_search",)) == "triton"
    assert "nvcc not found" in caplog.text
    times.update(triton=RuntimeError("no triton"), cuda=RuntimeError("no nvcc"))
    assert autoselect.fastest_backend("GPU Z", DEV, ("swap_search",)) == "torch"


def test_choice_rules_without_timing(fake_timing, monkeypatch):
    times, calls = fake_timing
    both = ["triton", "cuda"]
    # ops the CUDA backend takes from Triton anyway: no timing
    assert autoselect.choose_fast_backend(DEV, ("column_losses",), both) == "triton"
    assert autoselect.choose_fast_backend(DEV, ("obs_sweep",), ["cuda"]) == "cuda"
    monkeypatch.setenv("FASTPRUNE_AUTO_BACKEND", "cuda")
    assert autoselect.choose_fast_backend(DEV, ("obs_sweep",), both) == "cuda"
    monkeypatch.setenv("FASTPRUNE_AUTO_BACKEND", "triton")
    assert autoselect.choose_fast_backend(DEV, ("swap_search",), both) == "triton"
    assert calls == []


def test_unwritable_cache_is_not_an_error(fake_timing, monkeypatch, tmp_path):
    times, _ = fake_timing
    times.update(triton=1.0, cuda=2.0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where a directory must go
    assert autoselect.fastest_backend("GPU X", DEV, ("obs_sweep",)) == "triton"


def test_auto_on_cpu_is_torch():
    assert resolve_backend("auto", torch.device("cpu"), ("obs_sweep",)) == "torch"


@pytest.mark.parametrize("op", autoselect.HANDWRITTEN_CUDA_OPS)
def test_timing_problems_fit_the_op_contract(op):
    """The inputs 'auto' times the kernels on are valid calls of the op (torch reference)."""
    from fastprune.ops import get_op

    args = autoselect._problem(op, torch.device("cpu"))
    out = get_op(op, "torch")(*args)
    assert all(torch.isfinite(t.double()).all() for t in out if t.is_floating_point())
