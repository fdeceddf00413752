"""Every layer solver's common leading signature `(W, H, sparsity, prune_n, prune_m, *, ...)`,
the former argument orders still accepted with a DeprecationWarning (and the same result),
and the skeleton's single run of an algorithm on a rescaled layer."""

import inspect

import pytest
import torch

import fastprune as fp
import fastprune.solvers.sparsegpt as sparsegpt_module
from fastprune.testing import random_layer

SOLVERS = {
    "magnitude_layer": fp.magnitude_layer,
    "wanda_layer": fp.wanda_layer,
    "gblm_layer": fp.gblm_layer,
    "sparsegpt_layer": fp.sparsegpt_layer,
    "rose_layer": fp.rose_layer,
    "sparseswaps_layer": fp.sparseswaps_layer,
    "compose_layer": fp.compose_layer,
    "fastprune_layer": fp.fastprune_layer,
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_common_leading_signature(name):
    params = inspect.signature(SOLVERS[name]).parameters.values()
    lead = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert lead == ["W", "H", "sparsity", "prune_n", "prune_m"]
    rest = [p for p in params if p.kind is not p.POSITIONAL_OR_KEYWORD]
    assert all(p.kind is p.KEYWORD_ONLY for p in rest), [p.name for p in rest]


def _layer(seed=0, rows=12, cols=32):
    gen = torch.Generator().manual_seed(seed)
    W, H, _ = random_layer(rows, cols, generator=gen)
    G = torch.rand(W.shape, generator=gen)
    return W, H, G


def _same(a, b):
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
    assert a.loss == b.loss


# (former call, the same call in the common order)
LEGACY = {
    "magnitude": (
        lambda W, H, G, mask: fp.magnitude_layer(W, 0.5, 2, 4),
        lambda W, H, G, mask: fp.magnitude_layer(W, None, 0.5, 2, 4),
    ),
    "magnitude sparsity only": (
        lambda W, H, G, mask: fp.magnitude_layer(W, 0.25),
        lambda W, H, G, mask: fp.magnitude_layer(W, sparsity=0.25),
    ),
    "gblm": (
        lambda W, H, G, mask: fp.gblm_layer(W, H, G, 0.5, 0, 0, 2.0),
        lambda W, H, G, mask: fp.gblm_layer(W, H, 0.5, G=G, alpha=2.0),
    ),
    "sparsegpt": (
        lambda W, H, G, mask: fp.sparsegpt_layer(W, H, 0.5, 0, 0, 8, 0.05),
        lambda W, H, G, mask: fp.sparsegpt_layer(W, H, 0.5, blocksize=8, percdamp=0.05),
    ),
    "rose": (
        lambda W, H, G, mask: fp.rose_layer(W, H, 0.5, 2, 4, 8, 0.01, 0.0, "torch"),
        lambda W, H, G, mask: fp.rose_layer(
            W, H, 0.5, 2, 4, blocksize=8, range_threshold=0.0, backend="torch"
        ),
    ),
    "sparseswaps": (
        lambda W, H, G, mask: fp.sparseswaps_layer(W, H, mask, 3),
        lambda W, H, G, mask: fp.sparseswaps_layer(W, H, mask=mask, max_swaps=3),
    ),
    "compose": (
        lambda W, H, G, mask: fp.compose_layer(W, H, G, select="gblm", sparsity=0.5),
        lambda W, H, G, mask: fp.compose_layer(W, H, 0.5, G=G, select="gblm"),
    ),
}


@pytest.mark.parametrize("case", list(LEGACY))
def test_former_order_warns_and_gives_the_same_result(case):
    W, H, G = _layer()
    mask = fp.wanda_layer(W, H, 0.5).mask
    former, common = LEGACY[case]
    with pytest.warns(DeprecationWarning, match="former argument order"):
        old = former(W, H, G, mask)
    _same(old, common(W, H, G, mask))


def test_former_order_errors_name_the_problem():
    W, H, _ = _layer()
    with pytest.raises(TypeError, match="multiple values for 'sparsity'"):
        fp.magnitude_layer(W, 0.5, sparsity=0.3)
    with pytest.raises(TypeError, match="at most 9"):
        fp.sparsegpt_layer(W, H, 0.5, 0, 0, 8, 0.01, None, "auto", "extra")


@pytest.mark.parametrize("solver", [fp.sparsegpt_layer, fp.rose_layer])
def test_rescaled_layer_runs_the_algorithm_once(monkeypatch, solver):
    W, H, _ = _layer(seed=3)
    calls = []
    module = sparsegpt_module  # SparseGPT and ROSE both end in its sweep (`swept`)
    real = module.obs_prune

    def counted(*args, **kwargs):
        calls.append(args[0].abs().amax().item())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "obs_prune", counted)
    big = solver(W * 2.0**60, H, 0.5)
    assert len(calls) == 1 and calls[0] < 2.0**17  # one sweep, on the rescaled copy
    assert "rescaled" in big.info
    ref = solver(W, H, 0.5)
    assert torch.equal(big.mask, ref.mask)
    assert torch.equal(big.weight, ref.weight * 2.0**60)


def test_prune_model_takes_one_configuration():
    """`prune_model(model, calibration, config=None, **overrides)`: every pipeline option is
    a field of `PruneConfig` (and a keyword); the former positional options are taken by
    `*positional` with a DeprecationWarning (tests/test_config.py)."""
    params = inspect.signature(fp.prune_model).parameters
    assert list(params)[:3] == ["model", "calibration", "config"]
    kinds = {p.name: p.kind for p in params.values()}
    assert kinds["positional"] is inspect.Parameter.VAR_POSITIONAL
    assert kinds["overrides"] is inspect.Parameter.VAR_KEYWORD
    assert kinds["tokenizer"] is inspect.Parameter.KEYWORD_ONLY
    ckpt = inspect.signature(fp.prune_checkpoint).parameters
    assert list(ckpt)[:4] == ["checkpoint", "save", "calibration", "config"]
