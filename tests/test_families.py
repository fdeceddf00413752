"""Every causal-LM family of the installed transformers, built tiny and random, is either
pruned by SparseGPT 50% and Wanda 2:4 with each block's GEMM weights at the target and every
matrix left dense (routers among them) unchanged, or refused before any weight changes with
fastprune's own error (`benchmarks.families` holds the sweep and prints the table of
docs/families.md). A crash mid-prune, a weight changed by a refused run, a GEMM weight left
dense without a reason or a router pruned fails its family's test."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package

from benchmarks import families as sweep  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than several."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("family", sweep.families())
def test_family_is_pruned_or_refused_cleanly(family):
    out = sweep.sweep_family(family)
    if out.built is not None:
        pytest.skip(f"{family} cannot be built tiny: {out.built}")
    assert not out.failures, "\n".join(out.failures)
    assert set(out.results) == set(sweep.METHODS)
    for label, r in out.results.items():
        assert r.status in ("pruned", "refused"), (label, r)
        assert r.status == "pruned" or r.detail, (label, r)


# ------------------------------------------------------------- the sweep's checks can fail


@pytest.fixture(scope="module")
def llama():
    model = sweep.build("llama")
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _pruned(llama, spec):
    import fastprune as fp

    model, state = llama
    model.load_state_dict(state)
    report = fp.prune_model(model, sweep.calibration(model), progress=False, **spec)
    return model, state, report


@pytest.mark.parametrize("label", list(sweep.METHODS))
def test_a_clean_prune_passes_the_checks(llama, label):
    model, state, report = _pruned(llama, sweep.METHODS[label])
    assert sweep._check_pruned(model, state, report, sweep.METHODS[label]) == []


def test_the_checks_catch_a_changed_dense_matrix_and_a_layer_off_target(llama):
    spec = sweep.METHODS["Wanda 2:4"]
    model, state, report = _pruned(llama, spec)
    blocks = model.model.layers
    with torch.no_grad():
        blocks[0].input_layernorm.weight.add_(1.0)  # no block matrix: must stay unchanged
        blocks[1].mlp.up_proj.weight.copy_(state["model.layers.1.mlp.up_proj.weight"])
    problems = " ".join(sweep._check_pruned(model, state, report, spec))
    assert "model.layers.0.input_layernorm.weight (not a block matrix) changed" in problems
    assert "1.mlp.up_proj is not 2:4 sparse" in problems


def test_the_checks_catch_a_matrix_neither_pruned_nor_dense_and_a_pruned_router():
    import fastprune as fp

    model = sweep.build("mixtral")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = sweep.METHODS["SparseGPT 50%"]
    report = fp.prune_model(model, sweep.calibration(model), progress=False, **spec)
    gate = next(d for d in report.dense if d["name"] == "1.mlp.gate.weight")  # a router
    report.dense.remove(gate)
    problems = " ".join(sweep._check_pruned(model, state, report, spec))
    assert "model.layers.1.mlp.gate.weight [4, 64] is neither pruned nor listed" in problems
    with torch.no_grad():  # the router, pruned and reported as a pruned layer
        model.model.layers[1].mlp.gate.weight[:, ::2] = 0
    report.layers.append(dataclasses.replace(report.layers[-1], name="1.mlp.gate"))
    problems = " ".join(sweep._check_pruned(model, state, report, spec))
    assert "model.layers.1.mlp.gate.weight looks like a router" in problems


def test_a_crash_mid_prune_and_a_refusal_that_changed_weights_fail(monkeypatch, llama):
    import fastprune as fp

    model, state = llama
    calib = sweep.calibration(model)

    def crash(model, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(fp, "prune_model", crash)
    r = sweep.prune_once(model, state, calib, sweep.METHODS["SparseGPT 50%"])
    assert r.status == "FAIL" and "RuntimeError: boom" in r.detail

    def refuse_late(model, *a, **k):
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.zero_()
        raise ValueError("refused")

    monkeypatch.setattr(fp, "prune_model", refuse_late)
    r = sweep.prune_once(model, state, calib, sweep.METHODS["SparseGPT 50%"])
    assert r.status == "FAIL" and "after changing" in r.detail


def test_transposed_experts_whose_down_proj_is_square_read_as_transposed():
    """Llama-4's layout `[E, in, out]` with the experts as wide as the model: down_proj
    `[E, H, H]` is square, gate_up_proj `[E, H, 2H]` tells the orientation."""
    from torch import nn

    from fastprune.pipeline.experts import fused_experts

    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.zeros(4, 64, 128))
    experts.down_proj = nn.Parameter(torch.zeros(4, 64, 64))
    assert fused_experts(experts).transposed
    experts.gate_up_proj = nn.Parameter(torch.zeros(4, 128, 64))  # [E, out, in]
    assert not fused_experts(experts).transposed
