"""The method registry `fastprune.METHODS`: entries agree with their solvers, the CLI and
`prune_model` are driven by it, and a method added to it is usable with no other change."""

from __future__ import annotations

import inspect

import pytest
import torch
from pipeline_helpers import calib_ids, tiny_model

import fastprune as fp
import fastprune.pipeline
from fastprune.app import cli
from fastprune.hessian import InverseHessian
from fastprune.methods import GRADIENT_OPTIONS, METHODS, Method, composed, get_method, selectors
from fastprune.models import find_blocks, find_linears, get_weight
from fastprune.solvers import registry

# model-level defaults that differ from the solver's own on purpose
PIPELINE_DEFAULTS = {
    ("sparseswaps", "max_swaps"): ("auto", None),
}


def _params(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


BUILT_IN = [
    "magnitude", "wanda", "sparsegpt", "rose", "gblm", "sparseswaps", "fastprune", "gptq"
]  # fmt: skip


def test_one_registry_everywhere():
    # the built-in methods, in the order their modules register them, ahead of any other
    assert list(METHODS)[: len(BUILT_IN)] == BUILT_IN
    assert fp.METHODS is METHODS is registry.METHODS and fastprune.pipeline.METHODS is METHODS
    assert {"magnitude", "wanda", "gblm", "sparsegpt", "rose"} <= set(selectors())
    assert selectors() == [k for k, m in METHODS.items() if m.select is not None]
    assert {"wanda", "gblm"} <= set(registry.methods_where("reads_diagonal"))
    assert "METHODS" in fp.__all__
    for name, m in METHODS.items():
        assert m.name == name and isinstance(m, Method)
        assert m.description and "\n" not in m.description
        with pytest.raises(TypeError):
            m.options["new"] = 1  # options are read-only
        with pytest.raises(AttributeError):
            m.name = "other"  # frozen


@pytest.mark.parametrize("name", list(METHODS))
def test_entries_match_solver_signatures(name):
    m = METHODS[name]
    params = _params(m.solver)
    lead = [p.name for p in params.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert lead == ["W", "H", "sparsity", "prune_n", "prune_m"], f"{name}: leading arguments"
    rest = [p for p in params.values() if p.kind is not p.POSITIONAL_OR_KEYWORD]
    assert all(p.kind is p.KEYWORD_ONLY for p in rest), f"{name}: options are keywords"
    required = [p.name for p in rest if p.default is p.empty]
    assert required == ["G"] * m.needs_gradients, f"{name}: required keywords"
    # every option is accepted by the solver or consumed by the pipeline, never both
    for opt, default in m.options.items():
        if opt in m.pipeline_options:
            assert opt not in params, f"{name}: {opt} is consumed by the pipeline"
            continue
        assert opt in params, f"{name}: the solver does not take option {opt!r}"
        solver_default = params[opt].default
        want = PIPELINE_DEFAULTS.get((name, opt), (solver_default, solver_default))
        assert (default, solver_default) == want, f"{name}.{opt}: default {default!r}"
    assert set(m.solver_options) | set(m.pipeline_options) == set(m.options)
    if m.needs_gradients:
        assert set(GRADIENT_OPTIONS) <= set(m.pipeline_options)
    if m.shares_inverse:
        assert "hinv" in params and "percdamp" in m.options


def test_registry_rejects_inconsistent_entries():
    with pytest.raises(ValueError, match="gradients"):
        Method("g", fp.gblm_layer, "no gradient options", {"alpha": 1.0}, needs_gradients=True)
    with pytest.raises(ValueError, match="percdamp"):
        Method("s", fp.sparsegpt_layer, "no percdamp", {"blocksize": 128}, shares_inverse=True)
    with pytest.raises(ValueError, match="pipeline option"):
        Method("w", fp.wanda_layer, "stray", pipeline_options=("norm",))


def test_get_method_and_option_errors():
    with pytest.raises(ValueError, match="method must be one of magnitude, wanda"):
        get_method("obs")
    with pytest.raises(ValueError, match="method must be one of"):
        get_method(["rose"])  # unhashable: still a clear error
    with pytest.raises(TypeError, match="'wanda' does not take blocksize; it takes no options"):
        METHODS["wanda"].check_options({"blocksize": 64})
    assert METHODS["rose"].check_options({"percdamp": 0.1}) == {
        "blocksize": 128,
        "percdamp": 0.1,
        "range_threshold": 0.5,
        "backend": "auto",
        "score_scaler": "hessian",
    }
    with pytest.raises(ValueError, match="max_swaps"):
        METHODS["sparseswaps"].check_options({"max_swaps": -1})
    with pytest.raises(ValueError, match="norm"):
        METHODS["gblm"].check_options({"norm": "l3"})


def test_cli_method_choices_are_the_registry(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["prune"]
    method = next(a for a in sub._actions if a.dest == "method")
    assert method.help.split(" | ") == list(METHODS)
    assert method.default in METHODS
    assert all(f"  {k:<12} {m.description}" in sub.epilog for k, m in METHODS.items())
    for name in METHODS:  # accepted: fails later, on the model
        nothing = [] if METHODS[name].prunes else ["--sparsity", "0"]
        assert cli.main(["prune", "--method", name, "--model", "no-such-model", *nothing]) == 2
        err = capsys.readouterr().err
        assert "unknown model" in err and "--method" not in err, name
    assert cli.main(["prune", "--method", "obs"]) == 2
    assert "--method must be one of " + ", ".join(METHODS) in capsys.readouterr().err


def test_cli_flags_reach_the_methods_that_declare_them():
    assert set(cli.OPTION_FLAGS.values()) <= {k for m in METHODS.values() for k in m.options}
    flags = ["--backend", "torch", "--max-swaps", "3", "--reconstruct", "--gblm-norm", "l1"]
    given = {"backend": "torch", "max_swaps": 3, "reconstruct": True, "norm": "l1"}
    for name, m in METHODS.items():
        bare = cli.build_parser().parse_args(["prune", "--method", name])
        assert cli.prune_job(bare).method_options() == {}, name  # the registry's defaults apply
        args = cli.build_parser().parse_args(["prune", "--method", name, *flags])
        opts = cli.prune_job(args).method_options()
        # --reconstruct on a mask selector composes it (fastprune.methods.composed)
        runs = composed(m, given)
        assert (runs is not m) == (m.select is not None), name
        assert opts == {k: v for k, v in given.items() if k in runs.options}, name
        runs.check_options(opts)
    args = cli.build_parser().parse_args(["prune", "--method", "sparseswaps", *flags])
    assert cli.prune_job(args).method_options() == {
        "backend": "torch",
        "max_swaps": 3,
        "reconstruct": True,
    }


# ------------------------------------------------------------------- a registered toy method


def _toy_solver(calls):
    def toy_layer(W, H, sparsity=0.5, prune_n=0, prune_m=0, *, tag="plain", hinv=None):
        calls.append({"shape": tuple(W.shape), "H": tuple(H.shape), "tag": tag, "hinv": hinv})
        return fp.wanda_layer(W, H, sparsity, prune_n, prune_m)

    return toy_layer


def test_registered_toy_method_runs_through_prune_model_and_cli(monkeypatch, capsys):
    calls = []
    toy = Method(
        "toy",
        _toy_solver(calls),
        "Wanda under another name, with one inverse per shared input",
        {"tag": "plain", "percdamp": 0.01},
        shares_inverse=True,
        pipeline_options=("percdamp",),
    )
    monkeypatch.setitem(METHODS, "toy", toy)
    calib = calib_ids()
    model, ref = tiny_model("llama"), tiny_model("llama")
    rep = fp.prune_model(model, calib, method="toy", tag="mine", progress=False)
    fp.prune_model(ref, calib, method="wanda", progress=False)
    assert rep.method == "toy"
    want = {"tag": "mine", "percdamp": 0.01, "hessian_precision": "auto", "hessian_kind": "full"}
    want["allocation"] = "uniform"
    assert rep.options == want
    _, blocks = find_blocks(model)
    _, ref_blocks = find_blocks(ref)
    lins = [lin for b in blocks for lin in find_linears(b).values()]
    ref_lins = [lin for b in ref_blocks for lin in find_linears(b).values()]
    assert len(calls) == len(lins) == len(rep.layers)
    for c, lin, r in zip(calls, lins, ref_lins):
        assert c["tag"] == "mine" and c["shape"] == tuple(get_weight(lin).shape)
        assert isinstance(c["hinv"], InverseHessian)
        assert torch.equal(lin.weight, r.weight)  # the solver's result was written back
    # q/k/v share one input, so one inverse object
    assert calls[0]["hinv"] is calls[1]["hinv"] is calls[2]["hinv"]
    assert calls[3]["hinv"] is not calls[0]["hinv"]
    with pytest.raises(TypeError, match="'toy' does not take blocksize; it takes tag, percdamp"):
        fp.prune_model(tiny_model("llama"), calib, method="toy", blocksize=8)
    assert cli.main(["prune", "--method", "toy", "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
    monkeypatch.delitem(METHODS, "toy")
    with pytest.raises(ValueError, match="method must be one of"):
        fp.prune_model(tiny_model("llama"), calib, method="toy")


def test_toy_method_without_calibration(monkeypatch):
    def halve(W, H=None, sparsity=0.5, prune_n=0, prune_m=0, *, scale=1.0):
        return fp.magnitude_layer(W * scale, H, sparsity, prune_n, prune_m)

    monkeypatch.setitem(
        METHODS, "halve", Method("halve", halve, "magnitude of scaled W", {"scale": 2.0}, False)
    )
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    W0 = get_weight(blocks[0].self_attn.q_proj).detach().clone()
    rep = fp.prune_model(model, None, method="halve", progress=False)
    assert rep.nsamples == 0 and rep.options == {"scale": 2.0}
    assert all(lr.loss is None and lr.hessian is None for lr in rep.layers)
    Wp = get_weight(blocks[0].self_attn.q_proj)
    assert torch.equal(Wp, fp.magnitude_layer(W0 * 2.0).weight)


# (method, pattern, options) whose rows the registry says are solved independently, and some
# it says are not (a layer-wide threshold, ROSE's column order, reconstruct="best")
SEPARABLE = [
    ("magnitude", (2, 4), {}),
    ("wanda", (0, 0), {}),
    ("wanda", (4, 8), {}),
    ("gblm", (0, 0), {}),
    ("sparsegpt", (2, 4), {"blocksize": 8}),
    ("sparseswaps", (0, 0), {"max_swaps": 6}),
    ("sparseswaps", (2, 4), {"max_swaps": 6, "reconstruct": True}),
    ("wanda", (0, 0), {"refine": "sparseswaps", "reconstruct": True, "max_swaps": 3}),
    ("sparsegpt", (2, 4), {"refine": "sparseswaps", "max_swaps": 3, "blocksize": 8}),
    ("fastprune", (0, 0), {"select": "wanda", "reconstruct": True, "max_swaps": 3}),
    ("rose", (2, 4), {"blocksize": 8}),  # the column order of the whole layer
    ("rose", (4, 8), {"blocksize": 8, "range_threshold": 0.0}),  # always reordered
    ("fastprune", (2, 4), {"max_swaps": 3, "blocksize": 8, "reconstruct": "best_rows"}),
    ("fastprune", (2, 4), {"blocksize": 8}),  # the recipe at N:M: ROSE, per-row least squares
    ("sparsegpt", (4, 8), {"reconstruct": "lstsq", "refit_iters": 5}),
    ("wanda", (0, 0), {"refine": "sparseswaps", "reconstruct": "best_rows", "max_swaps": 3}),
]
COUPLED = [
    ("magnitude", (0, 0), {}),
    ("sparsegpt", (0, 0), {}),
    ("rose", (0, 0), {}),
    ("fastprune", (0, 0), {}),
    ("sparsegpt", (0, 0), {"refine": "sparseswaps", "reconstruct": "best"}),
    ("fastprune", (2, 4), {"refine": "sparseswaps", "reconstruct": "best"}),  # whole layer
    ("wanda", (2, 4), {"refine": "sparseswaps", "reconstruct": "best"}),
]


def _layer(rows=13, cols=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4 * cols, cols, generator=g) * torch.rand(cols, generator=g) * 3
    H = 2 * X.t() @ X / X.shape[0]
    G = torch.rand(rows, cols, generator=g)
    return W, H, G


@pytest.mark.parametrize("name,pattern,options", SEPARABLE, ids=str)
def test_separable_methods_solve_row_slices_exactly(name, pattern, options):
    """What a distributed prune relies on when it splits a layer's rows across ranks: the
    row slices' solves, stacked, are the whole layer's solve, and their losses add up."""
    meth = composed(get_method(name), options)
    opts = meth.check_options(options)
    n, m = pattern
    assert meth.separable(n, opts)
    W, H, G = _layer()
    W0 = W.clone()
    hinv = fp.inverse_hessian(H, 0.01) if meth.shares_inverse else None
    whole = meth.solve(W, H, G, 0.5, n, m, opts, hinv)
    parts = [
        meth.solve(W, H, G, 0.5, n, m, opts, hinv, slice(a, b))
        for a, b in ((0, 5), (5, 6), (6, 13))
    ]
    assert torch.equal(W, W0)
    if options.get("range_threshold") == 0.0:
        assert whole.info["reordered"] and all(p.info["reordered"] for p in parts)
    assert torch.equal(torch.cat([p.mask for p in parts]), whole.mask)
    torch.testing.assert_close(
        torch.cat([p.weight for p in parts]), whole.weight, rtol=1e-5, atol=1e-6
    )
    if whole.loss is not None:
        assert sum(p.loss for p in parts) == pytest.approx(whole.loss, rel=1e-5)


@pytest.mark.parametrize("name,pattern,options", COUPLED, ids=str)
def test_coupled_methods_refuse_row_slices(name, pattern, options):
    meth = composed(get_method(name), options)
    opts = meth.check_options(options)
    assert not meth.separable(pattern[0], opts)
    W, H, G = _layer()
    with pytest.raises(ValueError, match="rows separately"):
        meth.solve(W, H, G, 0.5, *pattern, opts, None, slice(0, 5))


def test_rows_must_be_a_slice():
    W, H, _ = _layer()
    with pytest.raises(ValueError, match="rows must be a slice"):
        fp.rose_layer(W, H, prune_n=2, prune_m=4, rows=[0, 1])
    with pytest.raises(ValueError, match="rows must be a slice"):
        fp.rose_layer(W.clone(), H, prune_n=2, prune_m=4, rows=slice(0, 2), inplace=True)
    with pytest.raises(ValueError, match="rows must be a slice"):
        fp.compose_layer(W, H, select="wanda", rows=3)
