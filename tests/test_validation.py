"""Every documented bad input raises ValueError/TypeError naming the argument: the message
begins with the argument's name as a whole word (`names`), so a message about another
argument (say "W has 16 columns" for a bad H) cannot satisfy the check."""

import re

import pytest
import torch

import fastprune as fp

W = torch.randn(8, 16)
H = torch.eye(16)
G = torch.rand(8, 16)
LAYER_FNS = {
    "sparsegpt": lambda **kw: fp.sparsegpt_layer(**{"W": W, "H": H, **kw}),
    "rose": lambda **kw: fp.rose_layer(**{"W": W, "H": H, **kw}),
    "wanda": lambda **kw: fp.wanda_layer(**{"W": W, "H": H, **kw}),
    "gblm": lambda **kw: fp.gblm_layer(**{"W": W, "H": H, "G": G, **kw}),
    "magnitude": lambda **kw: fp.magnitude_layer(**{"W": W, **kw}),
}
HAS_H = ["sparsegpt", "rose", "wanda", "gblm"]


def names(arg: str) -> str:
    """`match=` pattern: the message begins with `arg` as a whole word."""
    return rf"^{re.escape(arg)}\b"


@pytest.mark.parametrize("method", list(LAYER_FNS))
@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"sparsity": -0.1}, ValueError, "sparsity"),
        ({"sparsity": float("nan")}, ValueError, "sparsity"),
        ({"sparsity": "half"}, TypeError, "sparsity"),
        ({"prune_n": 5, "prune_m": 4}, ValueError, "prune_n"),
        ({"prune_n": 4, "prune_m": 4}, ValueError, "prune_n"),
        ({"prune_n": 2, "prune_m": 0}, ValueError, "prune_m"),
        ({"prune_n": 2, "prune_m": 3}, ValueError, "prune_m"),
        ({"prune_n": 1.5, "prune_m": 4}, TypeError, "prune_n"),
        ({"W": torch.randn(16)}, ValueError, "W"),
        ({"W": torch.ones(8, 16, dtype=torch.int32)}, TypeError, "W"),
        ({"W": torch.full((8, 16), float("nan"))}, ValueError, "W"),
        ({"W": [[1.0]]}, TypeError, "W"),
    ],
)
def test_bad_common_inputs(method, kwargs, exc, word):
    with pytest.raises(exc, match=names(word)):
        LAYER_FNS[method](**kwargs)


@pytest.mark.parametrize("method", HAS_H)
@pytest.mark.parametrize(
    "Hbad,exc",
    [
        (torch.eye(15), ValueError),
        (torch.ones(16, 15), ValueError),
        (torch.full((16, 16), float("inf")), ValueError),
        (torch.eye(16, dtype=torch.int64), TypeError),
        ("eye", TypeError),
    ],
)
def test_bad_hessian(method, Hbad, exc):
    with pytest.raises(exc, match=names("H")):
        LAYER_FNS[method](H=Hbad)


@pytest.mark.parametrize("method", ["sparsegpt", "rose"])
def test_bad_solver_args(method):
    fn = LAYER_FNS[method]
    with pytest.raises(ValueError, match=names("blocksize")):
        fn(blocksize=0)
    with pytest.raises(ValueError, match=names("percdamp")):
        fn(percdamp=-1)
    with pytest.raises(ValueError, match=names("backend")):
        fn(backend="fastest")
    with pytest.raises(fp.BackendUnavailableError, match=r"^backend='cuda'"):
        fn(backend="cuda")


def test_meta_device_mismatch_named():
    with pytest.raises(ValueError, match=names("H")):
        fp.sparsegpt_layer(W, torch.eye(16, device="meta"))


def test_bad_mask():
    with pytest.raises(TypeError, match=names("mask")):
        fp.sparsegpt_layer(W, H, mask=torch.ones(8, 16))
    with pytest.raises(ValueError, match=names("mask")):
        fp.sparsegpt_layer(W, H, mask=torch.ones(8, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match=names("mask")):
        fp.sparseswaps_layer(W, H, prune_n=2, prune_m=4, mask=torch.ones(8, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=names("max_swaps")):
        fp.sparseswaps_layer(W, H, max_swaps=-1)


def test_bad_gradient():
    with pytest.raises(ValueError, match=names("G")):
        fp.gblm_layer(W, H, G=torch.rand(8, 15))
    with pytest.raises(ValueError, match=names("G")):
        fp.gblm_layer(W, H, G=-torch.rand(8, 16))
    with pytest.raises(TypeError, match=names("alpha")):
        fp.gblm_layer(W, H, G=G, alpha="1")


@pytest.mark.parametrize("method", [*HAS_H, "sparseswaps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hessian_symmetry_tolerance(method, dtype):
    """Rounding-level asymmetry passes (tol = max(1e-4, 2 eps) * max|H|); 10x tol does not."""
    X = torch.randn(16, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Hg = X @ X.t() / 32
    tol = fp.validation.hessian_tolerance(dtype) * Hg.abs().max().item()
    fn = LAYER_FNS.get(method) or (lambda **kw: fp.sparseswaps_layer(W, kw["H"], max_swaps=1))
    for gap, ok in ((0.4 * tol, True), (10 * tol, False)):
        Hb = Hg.clone()
        Hb[2, 7] += gap
        Hb = Hb.to(dtype)
        if ok:
            fn(H=Hb)
        else:
            with pytest.raises(ValueError, match="H is not symmetric"):
                fn(H=Hb)
