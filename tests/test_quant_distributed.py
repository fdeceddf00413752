"""Quantized prunes on 2 gloo processes (CPU): every rank ends with the same quantized model
and the same codes and grids of every layer (each solved whole on its owner and shared), equal
to the single-process prune (bit for bit where no Hessian is summed over ranks; otherwise up to
the summation order of the ranks' Hessians, as the distributed tests of the other methods);
rank 0's save is the checkpoint of those codes, and a streamed quantized prune under the same
ranks writes the same checkpoint as the in-memory one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
from pipeline_helpers import calib_ids, tiny_model, tiny_moe_model
from test_quant_save import RTN, _rtn_solver

from fastprune import prune_model
from fastprune.app.quantized_checkpoint import compressed_tensors_of
from fastprune.app.saving import save_pruned
from fastprune.pipeline.distributed import ROW_SPLIT_ENV
from fastprune.solvers.registry import METHODS, Method, register, unregister

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

WORLD = 2
NSAMPLES = 5
CASES = {  # name: (family, prune_model options)
    "llama-rtn-int4-g32": ("llama", dict(method=RTN, quant="w4a16", group_size=32)),
    "llama-sparsegpt-int4-g32": (
        "llama",
        dict(method="sparsegpt", quant="w4a16", group_size=32, blocksize=16),
    ),  # fmt: skip
    "llama-gptq-int8-asym": (
        "llama",
        dict(method="gptq", sparsity=0.0, quant="w8a16", sym=False),
    ),  # fmt: skip
    "mixtral-sparsegpt-fp8-2:4": (
        "mixtral",
        dict(method="sparsegpt", prune_n=2, prune_m=4, quant="fp8", blocksize=16),
    ),  # fmt: skip
}
SAVED = "llama-sparsegpt-int4-g32"  # rank 0 saves it in memory and streams it


def _rtn() -> None:
    if RTN not in METHODS:
        register(
            Method(RTN, _rtn_solver, "test: magnitude + RTN", needs_hessian=False,
                   takes_quant=True)
        )  # fmt: skip


def _model(family: str):
    return tiny_model(family) if family == "llama" else tiny_moe_model(family)


def _prune(case: str, model=None):
    family, kw = CASES[case]
    model = _model(family) if model is None else model
    calib = None if kw["method"] == RTN else calib_ids(NSAMPLES)
    report = prune_model(model, calib, progress=False, **{"sparsity": 0.5, **kw})
    return model, report


def _layers(rep: dict) -> list:
    """What a report says of each layer (not its seconds)."""
    return [(lr["name"], lr["sparsity"], lr["loss"], lr["info"]["quant"]) for lr in rep["layers"]]


def _quantized(report) -> dict:
    return {k: (q.codes, q.scale, q.zero, q.g_idx) for k, q in report.quantized.items()}


def _worker(rank: int, init: str, out: str, src: str) -> None:
    from fastprune.pipeline.stream import prune_checkpoint

    torch.set_num_threads(1)
    _rtn()
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    d = Path(out).parent
    try:
        results = {}
        for case in CASES:
            model, report = _prune(case)
            weights = {k: v.clone() for k, v in model.state_dict().items()}
            results[case] = (weights, _quantized(report), report.to_dict())
            if case == SAVED and rank == 0:
                save_pruned(model, None, d / "saved", report)
        os.environ[ROW_SPLIT_ENV] = "always"  # quantized layers stay whole
        try:
            _, report = _prune(SAVED)
            results["split"] = report.to_dict()
        finally:
            del os.environ[ROW_SPLIT_ENV]
        family, kw = CASES[SAVED]
        rep = prune_checkpoint(src, d / "streamed", calib_ids(NSAMPLES), progress=False,
                               **{"sparsity": 0.5, **kw})  # fmt: skip
        results["streamed"] = rep.to_dict()
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("qdist")
    src = d / "src"
    _model(CASES[SAVED][0]).save_pretrained(src, max_shard_size="60KB")
    tmp_mp.start_processes(
        _worker,
        args=(f"file://{d / 'rendezvous'}", str(d / "out"), str(src)),
        nprocs=WORLD,
        start_method="spawn",
    )
    return d, [torch.load(f"{d / 'out'}.{r}", weights_only=False) for r in range(WORLD)]


@pytest.fixture
def rtn():
    _rtn()
    yield RTN
    unregister(RTN)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.dtype.is_floating_point and a.element_size() == 1:  # float8: the bytes
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_every_rank_holds_the_single_process_quantized_model(ranks, rtn, case):
    _, got = ranks
    (w0, q0, r0), (w1, q1, r1) = got[0][case], got[1][case]
    # the ranks agree bit for bit: weights, every layer's codes and grids, the report
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert list(q0) == list(q1)
    assert all(all(_same(a, b) for a, b in zip(q0[k], q1[k])) for k in q0)
    assert r0["layers"] == r1["layers"] and r0["totals"]["quant"] == r1["totals"]["quant"]
    assert r0["totals"]["world_size"] == WORLD
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, report = _prune(case)
    finally:
        torch.set_num_threads(threads)
    want = _quantized(report)
    assert sorted(q0) == sorted(want)  # every layer quantized
    if case.startswith("llama-rtn"):  # no Hessian summed over ranks: bit for bit
        for k, v in model.state_dict().items():
            assert torch.equal(w0[k], v), k
        for k in want:
            assert all(_same(a, b) for a, b in zip(q0[k], want[k])), k
        assert _layers(r0) == _layers(report.to_dict())
        return
    # the ranks' summed Hessians differ in summation order: a near-tie may round a weight
    # the other way, and the row's error feedback carries that on; other rows are equal
    for k, (codes, scale, zero, g_idx) in want.items():
        c0, s0, z0, g0 = q0[k]
        assert _same(g0, g_idx), k
        same_rows = (c0.float() == codes.float()).all(1)
        assert same_rows.float().mean() >= 0.9, f"{k}: {int((~same_rows).sum())} rows differ"
        torch.testing.assert_close(s0[same_rows], scale[same_rows], rtol=1e-5, atol=0)
        if zero is not None:
            assert torch.equal(z0[same_rows], zero[same_rows]), k
    for ld, ls in zip(r0["layers"], report.to_dict()["layers"], strict=True):
        assert ld["name"] == ls["name"] and ld["sparsity"] == pytest.approx(
            ls["sparsity"], abs=2e-3
        )
        assert ld["info"]["quant"]["bytes"] == ls["info"]["quant"]["bytes"]


def test_quantized_layers_are_not_split_across_ranks(ranks):
    """FASTPRUNE_ROW_SPLIT=always: a quantized layer is still solved whole on its owner."""
    _, got = ranks
    split = got[0]["split"]
    assert all("row_parts" not in lr["info"] for lr in split["layers"])
    assert _layers(split) == _layers(got[0][SAVED][2])


def test_rank0_saves_the_codes_and_streams_the_same_checkpoint(ranks):
    """Rank 0's save holds the compressed tensors of the codes every rank holds (rank 1's
    here), and the streamed prune under the same two ranks wrote the same tensors."""
    d, got = ranks
    _, q1, report = got[1][SAVED]
    saved = _tensors(d / "saved")
    from fastprune.quant import QuantizedWeight, QuantSpec

    spec = QuantSpec(4, 32)
    for name, (codes, scale, zero, g_idx) in q1.items():
        q = QuantizedWeight(spec, codes, scale, zero, g_idx)
        for key, t in compressed_tensors_of(q, torch.float32).items():
            assert _same(saved[f"{name}.{key}"], t), f"{name}.{key}"
    streamed = _tensors(d / "streamed")
    assert streamed.keys() == saved.keys()
    bad = [k for k in saved if not _same(streamed[k], saved[k])]
    assert not bad, f"{len(bad)} tensors differ, first {bad[:3]}"
    assert _layers(got[0]["streamed"]) == _layers(report)
    assert got[0]["streamed"]["totals"]["saved"] == str(d / "streamed")
