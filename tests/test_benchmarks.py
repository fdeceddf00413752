"""Benchmark scripts run and write well-formed rows (tiny sizes; no timing is asserted)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_end_to_end_benchmark_row(tmp_path):
    pytest.importorskip("transformers")
    from benchmarks import bench_end_to_end

    out = tmp_path / "e2e"
    bench_end_to_end.main(
        ["--shape", "small", "--blocks", "2", "--nsamples", "2", "--seqlen", "32"]
        + ["--device", "cpu", "--out", str(out)]
    )
    (r,) = json.loads(out.with_suffix(".json").read_text())
    for key in ("kernel", "backend", "shape", "dtype", "device", "torch", "median_ms"):
        assert key in r
    assert r["shape"] == "small (2/4 blocks)" and r["backend"] == "torch"
    assert r["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert r["projected_full_model_s"] == pytest.approx(r["seconds_per_block"] * 4, abs=0.2)
    assert out.with_suffix(".csv").read_text().startswith("kernel,")
