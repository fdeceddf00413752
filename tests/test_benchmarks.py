"""Benchmark modules run and write well-formed rows (tiny sizes, CPU, torch backend; no
timing is asserted)."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from fastprune.timing import Timing, measure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package

COMMON = ("kernel", "backend", "shape", "dtype", "device", "torch", "triton", "cuda")
TIMES = ("p20_ms", "median_ms", "p80_ms", "reps", "timer")
TINY = ["--device", "cpu", "--backends", "torch", "--shapes", "8x64"]


def read_rows(out):
    rows = json.loads(out.with_suffix(".json").read_text())
    assert rows and out.with_suffix(".csv").read_text().startswith("kernel,")
    for r in rows:
        for key in COMMON + TIMES:
            assert key in r, (key, r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["reps"] >= 1
    return rows


def run(module, argv, tmp_path):
    out = tmp_path / module
    importlib.import_module(f"benchmarks.{module}").main([*argv, "--out", str(out)])
    return read_rows(out)


def test_measure_on_cpu_counts_calls():
    calls = []
    t = measure(lambda: calls.append(1), "cpu", warmup=2, rep=5)
    assert isinstance(t, Timing) and t.reps == 5 and len(calls) == 7
    assert t.timer == "perf_counter" and t.p20_ms <= t.median_ms <= t.p80_ms
    assert Timing.once(3.0).median_ms == 3.0


def test_obs_sweep_benchmark(tmp_path):
    rows = run("bench_obs_sweep", [*TINY, "--blocksize", "32"], tmp_path)
    kinds = {(r["kernel"], r["backend"], r.get("pattern")) for r in rows}
    assert ("floor", "torch", None) in kinds
    for solver in ("sparsegpt_layer", "rose_layer"):
        assert (solver, "torch", "unstructured") in kinds and (solver, "torch", "2:4") in kinds
        assert (solver, "original", "unstructured") in kinds
    assert ("obs_sweep", "torch", "2:4") in kinds
    solve = next(r for r in rows if r["kernel"] == "sparsegpt_layer" and r["backend"] == "torch")
    assert solve["kernels"] == "block_prune_mask=torch obs_sweep=torch"
    assert "speedup_vs_original" in solve and "x_floor" in solve


def test_column_losses_benchmark(tmp_path):
    rows = run("bench_column_losses", [*TINY, "--blocksize", "32"], tmp_path)
    kinds = {(r["kernel"], r["backend"], r.get("pattern")) for r in rows}
    assert {("read_scores", "torch", None), ("column_losses", "original", "unstructured")} <= kinds
    assert {("column_losses", "torch", "unstructured"), ("column_losses", "torch", "2:4")} <= kinds
    assert all("gbps" in r for r in rows if r["backend"] == "torch")


def test_block_prune_mask_benchmark(tmp_path):
    rows = run("bench_block_prune_mask", [*TINY, "--blocksize", "32"], tmp_path)
    assert [(r["backend"], r["shape"]) for r in rows] == [("original", "8x32"), ("torch", "8x32")]


def test_swap_search_benchmark(tmp_path):
    rows = run("bench_swap_search", TINY, tmp_path)
    kinds = {(r["kernel"], r["backend"], r["pattern"]) for r in rows}
    for pat in ("unstructured", "2:4"):
        for kernel in ("swap_search", "swap_step"):
            assert {(kernel, "torch", pat), (kernel, "torch_fast", pat)} <= kinds
        assert ("swap_apply", "torch", pat) in kinds
    assert all(r["matches_ref"] for r in rows if r["kernel"] == "swap_search")


def test_refit_benchmark(tmp_path):
    rows = run("bench_refit", [*TINY, "--iters", "4,64"], tmp_path)
    kinds = [(r["kernel"], r["pattern"], r.get("iters")) for r in rows]
    assert ("obs_reconstruct", "2:4", None) in kinds and ("refit", "unstructured", 4) in kinds
    for r in rows:
        if r["kernel"] == "refit":
            assert 0 < r["loss_vs_obs"] <= 1.0 + 1e-6 and r["gflops"] > 0


def test_swap_quality_benchmark(tmp_path):
    rows = run("bench_swap_search", [*TINY, "--quality", "--patterns", "2:4"], tmp_path)
    assert {r["layer"] for r in rows} == {"independent", "low_rank"}
    assert all(r["error_reduction_pct"] >= 0 and r["timer"] == "once" for r in rows)


def test_cpu_reference_benchmark(tmp_path):
    rows = run("bench_cpu_reference", ["--shapes", "8x64", "--patterns", "unstructured"], tmp_path)
    assert {(r["kernel"], r["backend"]) for r in rows} == {
        (s, b)
        for s in ("sparsegpt_layer", "rose_layer", "gptq_layer")
        for b in ("original", "torch")
    }
    assert all(r["threads"] == torch.get_num_threads() for r in rows)


@pytest.mark.parametrize(
    "module",
    ["bench_obs_sweep", "bench_column_losses", "bench_block_prune_mask", "bench_swap_search"],
)
def test_unavailable_backends_are_skipped_with_a_note(module, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FASTPRUNE_CUDA_EMULATE", raising=False)
    argv = ["--device", "cpu", "--backends", "torch,cuda", "--shapes", "4x32"]
    if module != "bench_block_prune_mask":
        argv += ["--patterns", "unstructured"]
    rows = run(module, argv, tmp_path)
    assert "note: skipping backend cuda" in capsys.readouterr().out
    assert all(r["backend"] != "cuda" for r in rows)


def test_end_to_end_benchmark_row(tmp_path):
    pytest.importorskip("transformers")
    from benchmarks import bench_end_to_end

    out = tmp_path / "e2e"
    bench_end_to_end.main(
        ["--shape", "small", "--blocks", "2", "--nsamples", "2", "--seqlen", "32"]
        + ["--device", "cpu", "--out", str(out)]
    )
    (r,) = read_rows(out)
    assert r["shape"] == "small (2/4 blocks)" and r["backend"] == "torch"
    assert r["timer"] == "once" and r["reps"] == 1
    assert r["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert r["projected_full_model_s"] == pytest.approx(r["seconds_per_block"] * 4, abs=0.2)


def test_end_to_end_benchmark_moe_shape(tmp_path):
    """The MoE shape builds Qwen3-MoE blocks whose experts are pruned (and counted)."""
    pytest.importorskip("transformers")
    from benchmarks import bench_end_to_end

    out = tmp_path / "moe"
    bench_end_to_end.main(
        ["--shape", "moe-small", "--blocks", "1", "--nsamples", "2", "--seqlen", "32"]
        + ["--device", "cpu", "--method", "sparsegpt", "--out", str(out), "--no-warmup"]
    )
    (r,) = read_rows(out)
    assert r["shape"] == "moe-small (1/4 blocks)"
    assert r["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 0 < r["expert_solve_s"] <= r["solve_s"]


def test_distributed_benchmark_measures_1_and_2_processes(tmp_path):
    pytest.importorskip("transformers")
    from pipeline_helpers import byte_tokenizer, tiny_model

    d = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    rows = run("bench_distributed", ["--quick", "--model", str(d), "--threads", "2"], tmp_path)
    assert [r["nproc"] for r in rows] == [1, 2]
    one, two = rows
    assert one["speedup_vs_1"] == 1.0 and one["reduced_mb"] == 0 and "backend_dist" not in one
    assert two["backend_dist"] == "gloo" and two["reduced_mb"] > 0 and two["broadcast_mb"] > 0
    assert len(two["rank_calibration_s"].split("/")) == 2
    # both seconds and the speedup are rounded to 3 decimals: the ratio of the rounded seconds
    # is off by at most that rounding (relative 5e-4 / value for each)
    rounding = 5e-4 / one["seconds"] + 5e-4 / two["seconds"] + 5e-4 / two["speedup_vs_1"]
    assert two["speedup_vs_1"] == pytest.approx(
        one["seconds"] / two["seconds"], rel=rounding + 1e-9
    )
    assert two["max_rel_loss_diff_vs_1"] < 1e-3  # same losses up to summation order
    assert one["shape"] == f"{d} (2 blocks)" and one["calibration"] == "4x64"


def test_distributed_cost_model(tmp_path):
    from benchmarks import bench_distributed as bd

    times = (1.0, 0.5, 0.25)
    one = bd.project("llama2-7b", times, 1, 128, 100.0, 30.0, True)
    assert one["comm_s"] == 0 and one["speedup"] == pytest.approx(1.0)
    # SparseGPT shares inverses: every H has one owner, so it is reduced (not all-reduced)
    two = bd.project("llama2-7b", times, 2, 128, 100.0, 0.0, True)
    h_bytes = (3 * 4096**2 + 11008**2) * 8
    w_bytes = (4 * 4096**2 + 3 * 4096 * 11008) * 2
    assert two["reduced_mb"] * 2**20 == pytest.approx(h_bytes)
    assert two["comm_s"] == pytest.approx((h_bytes + w_bytes) / 100e9)
    assert two["calibration_s"] == 0.5 and two["other_s"] == 0.125
    for n in (2, 4, 8):
        p = bd.project("llama2-70b", times, n, 128, 100.0, 30.0, False)
        assert p["solve_s"] >= times[1] * p["largest_layer_share"] - 1e-12  # down_proj bounds it
        assert 0 < p["efficiency"] <= 1 and p["speedup"] <= n
    out = tmp_path / "cost"
    bd.main(["--cost-model", "--gpus", "1,4", "--nccl-gbps", "50", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["shape"], r["gpus"]) for r in rows] == [
        (s, n) for s in ("llama2-7b", "llama2-70b") for n in (1, 4)
    ]
    first = rows[0]  # the measured H100 figures: 1.738 s per block, 55.6 s for 32 blocks
    assert first["per_block_s"] == pytest.approx(1.738, abs=1e-3)
    assert first["projected_model_s"] == pytest.approx(55.6, abs=0.1)
    with pytest.raises(SystemExit):
        bd.main(["--cost-model", "--times", "llama2-7b=1,2"])


def test_quality_recipes_table(tmp_path):
    """The seeds x texts table is built from the resumable rows (no model is run here):
    mean and sample sd per cell, the recipe against the best peer seed by seed."""
    import argparse
    import json

    from benchmarks import quality_recipes as q

    out = tmp_path / "q"

    def row(config, pattern, seed, a, b, s=100.0):
        return {"config": config, "pattern": pattern, "seed": seed, "ppl_builtin": a,
                "ppl_gpl3": b, "prune_s": s}  # fmt: skip

    rows = [
        {"config": "dense", "pattern": "-", "seed": "-", "ppl_builtin": 12.5, "ppl_gpl3": 23.0},
        row("sparsegpt", "50%", 0, 18.0, 47.0),
        row("sparsegpt", "50%", 1, 19.0, 48.0),
        row("sparseswaps", "50%", 0, 21.0, 45.0, 200.0),
        row("sparseswaps", "50%", 1, 22.0, 46.0, 300.0),
        row("fastprune", "50%", 0, 17.0, 46.0),
        row("fastprune", "50%", 1, 18.0, 47.0),
        row("sparsegpt", "50%", 1, 20.0, 48.0),  # a rerun: the last row of a key counts
        row("sparsegpt+owl", "50%", 0, 19.5, 50.0),
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summ = q.summarize(q.load_rows(tmp_path / "q.jsonl"))
    cell = summ[("50%", "builtin")]["cells"]["sparsegpt"]
    assert (cell["mean"], cell["n"], cell["min"], cell["max"]) == (19.0, 2, 18.0, 20.0)
    assert cell["sd"] == pytest.approx(2**0.5)
    assert cell["prune_s"] == 100.0
    v = summ[("50%", "builtin")]["verdict"]  # 17.5 vs sparsegpt's 19.0, lower on both seeds
    assert v["best_peer"] == "sparsegpt" and (v["wins"], v["seeds"]) == (2, 2)
    assert v["margin_pct"] == pytest.approx(100 * 1.5 / 19.0)
    assert v["beyond_spread"]  # 1.5 above both sds (sparsegpt's 1.41)
    # paired by seed, in % of sparsegpt's mean: 1/19 and 2/19; two seeds, t(0.975, 1) wide
    assert v["diffs_pct"] == pytest.approx([100 / 19, 200 / 19])
    assert v["mean_pct"] == pytest.approx(v["margin_pct"])
    assert v["ci95_pct"] == pytest.approx([7.8947 - 33.437, 7.8947 + 33.437], abs=1e-3)
    v = summ[("50%", "gpl3")]["verdict"]  # 46.5 vs sparseswaps' 45.5: worse on both seeds
    assert v["best_peer"] == "sparseswaps" and v["wins"] == 0 and v["margin_pct"] < 0
    assert v["ci95_pct"] == pytest.approx([-100 / 45.5] * 2)  # the same gap on both seeds
    q.table(argparse.Namespace(out=str(out)))
    md = (tmp_path / "q.md").read_text().splitlines()
    assert md[2] == "| method | builtin | gpl3 | prune s |"
    assert md[4] == "| dense | 12.50 | 23.00 | |"
    assert md[5] == "| sparsegpt | 19.00 +- 1.41 (n=2) | 47.50 +- 0.71 (n=2) | 100 |"
    assert md[7] == "| fastprune | 17.50 +- 0.71 (n=2) | 46.50 +- 0.71 (n=2) | 100 |"
    assert md[8].startswith("| sparsegpt+owl | 19.50 +- 0.00 (n=1)")
    # every candidate against the best peer, the recipe first, each on the seeds both ran
    assert md[-4] == "| recipe | pattern | builtin | gpl3 |"
    assert md[-2] == (
        "| fastprune | 50% | +7.9% [-25.5, +41.3] vs sparsegpt (2/2) "
        "| -2.2% [-2.2, -2.2] vs sparseswaps (0/2) |"
    )
    assert md[-1] == (
        "| sparsegpt+owl | 50% | -8.3% vs sparsegpt (0/1) | -11.1% vs sparseswaps (0/1) |"
    )
    assert json.loads((tmp_path / "q.json").read_text())[1]["config"] == "sparsegpt"
    assert q.pattern_args("2:4") == {"sparsity": 0.5, "prune_n": 2, "prune_m": 4}
    assert q.pattern_args("70%") == {"sparsity": 0.7, "prune_n": 0, "prune_m": 0}
    assert q.parse_texts("builtin,mine=/x.txt") == {"builtin": "builtin", "mine": "/x.txt"}
    with pytest.raises(SystemExit, match="needs a path"):
        q.parse_texts("poetry")


def test_t_quantiles():
    """Two-sided 95% Student-t factors: the table up to df 30, the series beyond."""
    from benchmarks.quality_recipes import t_quantile_975 as t

    known = {1: 12.706, 2: 4.303, 4: 2.776, 10: 2.228, 30: 2.042, 40: 2.021, 60: 2.000,
             120: 1.980, 1000: 1.962}  # fmt: skip
    for df, want in known.items():
        assert t(df) == pytest.approx(want, abs=1e-3), df
    assert [t(d) for d in range(1, 61)] == sorted((t(d) for d in range(1, 61)), reverse=True)
    with pytest.raises(ValueError):
        t(0)


def test_quality_recipes_paired_intervals(tmp_path):
    """Five seeds, synthetic rows (no model run): the paired differences against the best
    peer, their mean and 95% interval in the summary, the .md table and OUT.summary.json; a
    "rose-published" configuration is a peer by default, `--peers` chooses others."""
    import argparse
    import json
    import statistics

    from benchmarks import quality_recipes as q

    ppl = {
        "sparsegpt": [20.0, 21.0, 19.0, 22.0, 18.0],  # mean 20
        "rose-published-running": [19.0, 20.0, 18.5, 21.0, 17.5],  # mean 19.2: the best peer
        "fastprune": [18.6, 19.5, 18.2, 20.4, 17.3],  # 0.4, 0.5, 0.3, 0.6, 0.2 below it
    }
    rows = [{"config": "dense", "pattern": "-", "seed": "-", "ppl_builtin": 12.0}]
    rows += [
        {"config": c, "pattern": "50%", "seed": s, "ppl_builtin": v, "prune_s": 10.0}
        for c, vs in ppl.items()
        for s, v in enumerate(vs)
    ]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert q.default_peers(rows) == [*q.PEERS, "rose-published-running"]
    lever = {"config": "rose-published+lstsq", "pattern": "50%", "seed": 0, "ppl_builtin": 1.0}
    assert q.default_peers([*rows, lever]) == [*q.PEERS, "rose-published-running"]
    v = q.summarize(rows)[("50%", "builtin")]["verdict"]
    gaps = [0.4, 0.5, 0.3, 0.6, 0.2]
    assert v["best_peer"] == "rose-published-running" and (v["wins"], v["seeds"]) == (5, 5)
    assert v["shared_seeds"] == [0, 1, 2, 3, 4] and v["df"] == 4
    assert v["diffs_pct"] == pytest.approx([100 * g / 19.2 for g in gaps])
    assert v["mean_pct"] == pytest.approx(100 * 0.4 / 19.2)
    assert v["sd_pct"] == pytest.approx(100 * statistics.stdev(gaps) / 19.2)
    half = 2.7764 * v["sd_pct"] / 5**0.5  # t(0.975, 4)
    assert v["ci95_pct"] == pytest.approx([v["mean_pct"] - half, v["mean_pct"] + half])
    assert v["ci95_pct"] == pytest.approx([1.0608, 3.1059], abs=1e-3)
    # only sparsegpt as the peer: 1.4, 1.5, 0.8, 1.6, 0.7 below its seeds (mean 20)
    v = q.summarize(rows, peers=["sparsegpt"])[("50%", "builtin")]["verdict"]
    assert v["best_peer"] == "sparsegpt"
    assert v["diffs_pct"] == pytest.approx([7.0, 7.5, 4.0, 8.0, 3.5])
    # a peer losing on some seeds: its interval reaches below 0
    worse = [dict(r, ppl_builtin=r["ppl_builtin"] + (1.0 if r["seed"] % 2 else -0.1))
             for r in rows if r["config"] == "fastprune"]  # fmt: skip
    v = q.summarize(rows + worse)[("50%", "builtin")]["verdict"]
    assert v["wins"] == 3 and v["ci95_pct"][0] < 0 < v["ci95_pct"][1]

    out = str(tmp_path / "q")
    q.table(argparse.Namespace(out=out))
    md = (tmp_path / "q.md").read_text().splitlines()
    assert md[5:8] == [
        "| sparsegpt | 20.00 +- 1.58 (n=5) | 10 |",
        "| rose-published-running | 19.20 +- 1.35 (n=5) | 10 |",
        "| fastprune | **18.80 +- 1.19** (n=5) | 10 |",  # its interval lies above 0
    ]
    assert md[-1] == "| fastprune | 50% | +2.1% [+1.1, +3.1] vs rose-published-running (5/5) |"
    summary = json.loads((tmp_path / "q.summary.json").read_text())
    assert summary["peers"] == [*q.PEERS, "rose-published-running"]
    (cmp,) = summary["comparisons"]
    assert (cmp["recipe"], cmp["pattern"], cmp["text"]) == ("fastprune", "50%", "builtin")
    assert cmp["ci95_pct"] == pytest.approx([1.0608, 3.1059], abs=1e-3)
    assert {c["config"] for c in summary["cells"]} == set(ppl)
    q.table(argparse.Namespace(out=out, peers="sparsegpt"))  # --peers: rose-published a rival
    md = (tmp_path / "q.md").read_text().splitlines()
    assert md[-2:] == [
        "| fastprune | 50% | +6.0% [+3.4, +8.6] vs sparsegpt (5/5) |",
        "| rose-published-running | 50% | +4.0% [+2.3, +5.7] vs sparsegpt (5/5) |",
    ]


def test_stream_benchmark_rows(tmp_path):
    """Both paths on a tiny random checkpoint, each in its own process: a row each with its
    own peak RSS, the same sparsity."""
    from benchmarks import bench_stream, make_random_checkpoint

    ckpt = tmp_path / "ckpt"
    make_random_checkpoint.main(
        [str(ckpt), "--blocks", "2", "--hidden", "64", "--heads", "4", "--vocab", "100"]
    )
    bench_stream.main(
        [str(ckpt), "--work", str(tmp_path / "work"), "--results", str(tmp_path / "res")]
        + ["--nsamples", "2", "--seqlen", "8"]
    )
    rows = json.loads((tmp_path / "res" / "stream_cpu.json").read_text())
    assert [r["path"] for r in rows] == ["streamed", "memory"]
    assert all(r["peak_rss_GB"] > 0 and r["blocks"] == 2 for r in rows)
    assert rows[0]["achieved_sparsity"] == rows[1]["achieved_sparsity"] > 0.45
    assert "| streamed | wanda |" in (tmp_path / "res" / "stream_cpu.md").read_text()


def test_cpu_device_name_says_model_isa_and_threads():
    from benchmarks.harness import cpu_model, device_name

    name = device_name("cpu")
    isa = torch.backends.cpu.get_cpu_capability()
    assert name.startswith("cpu (") and cpu_model() in name and isa in name, name
    assert name.endswith(" threads)"), name


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_admm_lever_keeps_the_pattern_and_refits_its_mask(n, m):
    """The ADMM lever: a valid pattern, its weights the least-squares refit on its own mask,
    and on a layer with correlated inputs a lower loss than SparseGPT's."""
    import fastprune as fp
    from benchmarks.admm_lever import admm_layer, pattern_support
    from fastprune.solvers.refit import refit_masked

    g = torch.Generator().manual_seed(5)
    X = torch.randn(400, 48, generator=g) @ (torch.eye(48) + 0.3 * torch.randn(48, 48, generator=g))
    H, W = X.T @ X, torch.randn(13, 48, generator=g)
    r = admm_layer(W, H, 0.5, n, m)
    if n:
        assert torch.all(r.mask.reshape(13, -1, m).sum(-1) == m - n)
    else:
        assert torch.all(r.mask.sum(1) == 24)
    ref, _ = refit_masked(W, H, r.mask, r.weight)
    torch.testing.assert_close(r.weight, ref, rtol=1e-4, atol=1e-5)
    assert r.loss < fp.sparsegpt_layer(W, H, 0.5, n, m).loss
    assert r.info["admm_iters"] >= 1 and not r.weight[~r.mask].any()
    Z = torch.tensor([[3.0, -1.0, 0.5, -4.0, 2.0, 0.1, -0.2, 5.0]])
    assert pattern_support(Z, 0.5, 0, 0).tolist() == [[True, False, False, True, True, False,
                                                       False, True]]  # fmt: skip
    assert pattern_support(Z, 0.5, 2, 4).tolist() == [[True, False, False, True, True, False,
                                                       False, True]]  # fmt: skip
