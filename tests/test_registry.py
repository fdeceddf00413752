"""A method registered from outside the package (here, from this file alone) runs everywhere a
built-in one does: the layer API, `compose_layer`, `prune_model`, the CLI and the messages that
name methods by what they can do."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import byte_tokenizer, calib_ids, tiny_model

import fastprune as fp
from fastprune.app.cli import build_parser, main
from fastprune.masks import selection_prune_mask
from fastprune.methods import composed
from fastprune.models import find_blocks, find_linears, get_weight
from fastprune.solvers.registry import (
    METHODS,
    Method,
    Selection,
    get_method,
    methods_where,
    register,
    selectors,
    unregister,
)


def toy_layer(W, H=None, sparsity=0.5, prune_n=0, prune_m=0):
    """Keep the largest |W| of each row (N:M per group); `H`, if given in full, for the loss."""
    pruned = selection_prune_mask(W.abs(), sparsity, prune_n, prune_m, per_row=True)
    weight = W.masked_fill(pruned, 0)
    loss = None if H is None or H.dim() == 1 else fp.layer_loss(W, weight, H)
    return fp.PruneResult(weight, ~pruned, loss, {"method": "toy"})


def _toy_select(W, H, sparsity, prune_n, prune_m, **_):
    return toy_layer(W, H, sparsity, prune_n, prune_m)


@pytest.fixture
def toy():
    meth = register(
        Method(
            "toy",
            toy_layer,
            "the largest |W| of each row",
            needs_hessian=False,
            select=Selection(_toy_select, row_separable=lambda prune_n: True),
        )
    )
    yield meth
    assert unregister("toy") is meth
    assert "toy" not in METHODS and "toy" not in selectors()


def _layer(rows=12, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4 * cols, cols, generator=g) * torch.rand(cols, generator=g) * 3
    return W, 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_toy_through_the_layer_api(toy, n, m):
    W, H = _layer()
    r = toy_layer(W, None, 0.5, n, m)
    # with H = 2I Wanda's score is exactly |W|: the same mask
    ref = fp.wanda_layer(W, 2 * torch.eye(W.shape[1]), 0.5, n, m)
    assert torch.equal(r.mask, ref.mask) and torch.equal(r.weight, ref.weight)
    via = get_method("toy").solve(W, H, None, 0.5, n, m, toy.check_options({}))
    assert torch.equal(via.mask, r.mask) and via.loss is None  # H is not given to it
    assert toy.separable(n, {})
    parts = [toy.solve(W, H, None, 0.5, n, m, {}, rows=slice(a, b)) for a, b in ((0, 5), (5, 12))]
    assert torch.equal(torch.cat([p.mask for p in parts]), r.mask)


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_toy_as_the_selector_of_a_composition(toy, n, m):
    W, H = _layer()
    mask = toy_layer(W, H, 0.5, n, m).mask
    sel = fp.compose_layer(W, H, 0.5, n, m, select="toy")
    assert torch.equal(sel.mask, mask) and sel.info["result"] == "toy"
    assert sel.info["recipe"]["select"] == "toy"
    kw = {"prune_n": n, "prune_m": m, "max_swaps": 4}
    ref = fp.sparseswaps_layer(W, H, mask=mask, **kw)
    c = fp.compose_layer(W, H, select="toy", refine="sparseswaps", **kw)
    assert torch.equal(c.mask, ref.mask) and torch.equal(c.weight, ref.weight)
    assert c.info["refine_swaps"] == ref.info["swaps"] > 0
    rec = fp.compose_layer(W, H, select="toy", refine="sparseswaps", reconstruct=True, **kw)
    obs = fp.sparsegpt_layer(W, H, prune_n=n, prune_m=m, mask=ref.mask)
    assert torch.equal(rec.weight, obs.weight) and rec.info["result"] == "reconstructed"
    lstsq = fp.compose_layer(W, H, 0.5, n, m, select="toy", reconstruct="lstsq")
    assert torch.equal(lstsq.mask, mask) and lstsq.loss < sel.loss
    # the recipe takes any selector too
    recipe = fp.fastprune_layer(W, H, 0.5, n, m, select="toy")
    torch.testing.assert_close(recipe.weight, lstsq.weight)


def test_compose_layer_refuses_a_method_without_a_selection_hook(toy):
    W, H = _layer()
    with pytest.raises(ValueError, match="select must be one of .*toy"):
        fp.compose_layer(W, H, select="sparseswaps")


def _linears(model):
    _, blocks = find_blocks(model)
    return [lin for b in blocks for lin in find_linears(b).values()]


def test_toy_through_prune_model(toy):
    model = tiny_model("llama")
    dense = [get_weight(lin).detach().clone() for lin in _linears(model)]
    rep = fp.prune_model(model, None, method="toy", progress=False)
    assert rep.method == "toy" and rep.nsamples == 0
    for W0, lin in zip(dense, _linears(model)):
        assert torch.equal(get_weight(lin), toy_layer(W0).weight)
    # composed: calibration for the swaps and the reconstruction
    calib = calib_ids(2, 16)
    rep = fp.prune_model(
        tiny_model("llama"), calib, method="toy", refine="sparseswaps", reconstruct=True,
        max_swaps=2, progress=False,
    )  # fmt: skip
    assert rep.method == "toy+sparseswaps+reconstruct"
    assert rep.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    assert all(lr.info["recipe"]["select"] == "toy" for lr in rep.layers)
    rep = fp.prune_model(tiny_model("llama"), calib, method="fastprune", select="toy")
    assert all(lr.info["recipe"]["select"] == "toy" for lr in rep.layers)


def test_toy_through_the_cli(toy, tmp_path, capsys):
    d = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    rep = tmp_path / "r.json"
    argv = ["prune", "--model", str(d), "--method", "toy", "--eval", "none", "--quiet"]
    assert main([*argv, "--report", str(rep)]) == 0
    doc = json.loads(rep.read_text())
    assert doc["method"] == "toy" and doc["achieved_sparsity"] == pytest.approx(0.5)
    flags = ["--refine", "sparseswaps", "--max-swaps", "2", "--nsamples", "2", "--seqlen", "16"]
    assert main([*argv, *flags, "--reconstruct", "lstsq", "--report", str(rep)]) == 0
    assert json.loads(rep.read_text())["method"] == "toy+sparseswaps+lstsq"
    capsys.readouterr()
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["prune"]
    helps = {a.dest: a.help for a in sub._actions}
    assert "toy" in helps["method"].split(" | ") and "/toy/" in helps["refine"]
    assert main(["prune", "--method", "toy", "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_messages_name_what_is_registered(toy):
    diag = register(
        Method("toydiag", fp.wanda_layer, "Wanda under another name", reads_diagonal=True)
    )
    try:
        assert methods_where("reads_diagonal")[-1] == "toydiag"
        with pytest.raises(ValueError, match="only wanda, gblm, toydiag read diag"):
            fp.prune_model(
                tiny_model("llama"), calib_ids(2, 16), method="rose", hessian_kind="diagonal"
            )
    finally:
        unregister(diag.name)
    with pytest.raises(ValueError, match="method must be one of .*, toy;"):
        get_method("nothing")


def test_register_checks():
    with pytest.raises(ValueError, match="already registered"):
        register(Method("wanda", fp.wanda_layer, "again"))
    with pytest.raises(TypeError, match="Method"):
        register("wanda")
    with pytest.raises(ValueError, match="method must be one of"):
        unregister("nothing")
    with pytest.raises(ValueError, match="not a Method field"):
        methods_where("fast")
    # a selector's own options must reach compose_layer's selection to be composed
    tagged = Method(
        "tagged", lambda W, H, s, n, m, *, tag=1: toy_layer(W, H, s, n, m), "tagged", {"tag": 1},
        select=Selection(_toy_select, row_separable=lambda prune_n: True),
    )  # fmt: skip
    assert composed(tagged, {}) is tagged
    with pytest.raises(TypeError, match="option tag does not reach compose_layer"):
        composed(tagged, {"refine": "sparseswaps"})
