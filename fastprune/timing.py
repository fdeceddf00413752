"""The one timer of fastprune: benchmarks and `backend="auto"`'s choice both measure with it.

`measure(fn, device, warmup, rep)` calls `fn()` `warmup` times untimed, then at least `rep`
times timed (more until `budget_ms` of timed calls, if given), and returns the 20th, 50th and
80th percentiles in milliseconds:

- CUDA with Triton installed: `triton.testing.do_bench` (L2 flushed before every timed call,
  CUDA events). It takes time budgets rather than counts, so the last warm-up call is timed
  and the counts are turned into budgets from it. A call slower than `SLOW_CALL_MS` skips
  do_bench (its own estimate alone costs 5 calls; the L2 flush means nothing there) and is
  timed with CUDA events, as is everything when Triton is missing. (A Triton older than
  `return_mode="all"` gives only its quantiles; `reps` is then its estimated count.)
- CPU: `time.perf_counter` around each call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

QUANTILES = (0.2, 0.5, 0.8)
SLOW_CALL_MS = 10.0
"""From this time per call on, CUDA calls are timed with events directly (no do_bench)."""
_L2_FLUSH_BYTES = 256 * 1024 * 1024  # do_bench's flush buffer: larger than any L2


@dataclass(frozen=True)
class Timing:
    """Percentiles of the time per call in milliseconds, over `reps` timed calls."""

    p20_ms: float
    p50_ms: float
    p80_ms: float
    reps: int
    timer: str  # "do_bench" | "cuda_events" | "perf_counter" | "once"

    @property
    def median_ms(self) -> float:
        return self.p50_ms

    @classmethod
    def of(cls, times_ms: list[float], timer: str) -> Timing:
        """The percentiles of the times per call (linear interpolation, as do_bench's)."""
        t = torch.tensor(times_ms, dtype=torch.float64)
        q = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        return cls(q[0], q[1], q[2], len(times_ms), timer)

    @classmethod
    def once(cls, ms: float) -> Timing:
        """A single measurement made elsewhere (e.g. a whole run timed around its call)."""
        return cls(ms, ms, ms, 1, "once")


def measure(
    fn: Callable[[], object],
    device: torch.device | str,
    warmup: int = 1,
    rep: int = 3,
    budget_ms: float = 0.0,
) -> Timing:
    """Time `fn()` on `device`: `warmup` untimed calls (at least two on CUDA when
    `warmup >= 1`: the last one sizes the timer), then at least `rep` timed calls, more until
    about `budget_ms` of timed calls. `warmup=0` times the first call too."""
    rep = max(1, int(rep))
    warmup = max(0, int(warmup))
    device = torch.device(device)
    if device.type != "cuda":
        return _measure_cpu(fn, warmup, rep, budget_ms)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is None or warmup == 0:
        return _measure_events(fn, device, warmup, rep, budget_ms)
    for _ in range(max(1, warmup - 1)):
        fn()
    (probe_ms,) = _event_times(fn, device, 1, flush=None)  # the last warm-up call
    if probe_ms >= SLOW_CALL_MS:
        return _measure_events(fn, device, 0, rep, budget_ms)
    # do_bench runs max(1, int(budget / its estimate)) calls: +0.5 so `rep` is not cut short
    rep_ms = max(budget_ms, (rep + 0.5) * probe_ms)
    with torch.cuda.device(device):  # do_bench synchronises the current device
        try:
            times = do_bench(fn, warmup=0, rep=rep_ms, return_mode="all")
            return Timing.of(list(times), "do_bench")
        except AssertionError:  # an older Triton without return_mode="all": its quantiles
            q = do_bench(fn, warmup=0, rep=rep_ms, quantiles=list(QUANTILES))
            return Timing(*(float(x) for x in q), max(1, int(rep_ms / probe_ms)), "do_bench")


def _measure_cpu(fn, warmup: int, rep: int, budget_ms: float) -> Timing:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < rep or sum(times) < budget_ms:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return Timing.of(times, "perf_counter")


def _measure_events(fn, device: torch.device, warmup: int, rep: int, budget_ms: float) -> Timing:
    for _ in range(warmup):
        fn()
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    times = _event_times(fn, device, rep, flush)
    while sum(times) < budget_ms:
        more = max(1, int((budget_ms - sum(times)) / max(times[-1], 1e-3)))
        times += _event_times(fn, device, min(more, 10 * rep + 100), flush)
    return Timing.of(times, "cuda_events")


def _event_times(fn, device: torch.device, n: int, flush: torch.Tensor | None) -> list[float]:
    """Milliseconds of `n` calls, each between two CUDA events (the L2 flushed before each
    when `flush` is given)."""
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        events = []
        for _ in range(n):
            if flush is not None:
                flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]
