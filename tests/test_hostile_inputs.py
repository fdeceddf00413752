"""Hostile inputs (issue 12, items 4, 6, 7, 8): each is refused up front with a ValueError or
TypeError naming the argument (or flag), before any work is done or a model is loaded."""

from __future__ import annotations

import pytest
import torch

import fastprune as fp
from fastprune.cli import main

COLS = 16


def _W():
    return torch.randn(8, COLS, generator=torch.Generator().manual_seed(0))


def _G():
    return torch.rand(8, COLS, generator=torch.Generator().manual_seed(1))


# every public entry point that takes H, called with (W, H)
H_TAKERS = {
    "sparsegpt": lambda W, H: fp.sparsegpt_layer(W, H),
    "rose": lambda W, H: fp.rose_layer(W, H),
    "wanda": lambda W, H: fp.wanda_layer(W, H),
    "gblm": lambda W, H: fp.gblm_layer(W, H, _G()),
    "magnitude": lambda W, H: fp.magnitude_layer(W, H=H),
    "sparseswaps": lambda W, H: fp.sparseswaps_layer(W, H, max_swaps=2),
    "inverse_hessian": lambda W, H: fp.inverse_hessian(H),
}


def _negative_definite():
    return -2 * torch.eye(COLS)


def _one_negative_diagonal():
    H = torch.eye(COLS)
    H[3, 3] = -0.5
    return H


def _indefinite_positive_diagonal():
    H = torch.eye(COLS)
    H[0, 1] = H[1, 0] = 3.0  # the 2x2 minor [[1, 3], [3, 1]] has determinant -8
    return H


def _asymmetric():
    X = torch.randn(COLS, 64, generator=torch.Generator().manual_seed(2))
    H = X @ X.t() / 32
    H[0, 5] += 0.01 * H.abs().max()  # one triangle differs by 1% of the scale
    return H


BAD_H = {
    "negative definite": (_negative_definite, "not positive semi-definite"),
    "negative diagonal": (_one_negative_diagonal, "not positive semi-definite"),
    "indefinite": (_indefinite_positive_diagonal, "not positive semi-definite"),
    "asymmetric": (_asymmetric, "not symmetric"),
}


# ------------------------------------------------------------------ item 4: one H check


@pytest.mark.parametrize("taker", list(H_TAKERS))
@pytest.mark.parametrize("kind", list(BAD_H))
def test_bad_hessian_rejected_by_every_method(taker, kind):
    make, words = BAD_H[kind]
    with pytest.raises(ValueError, match=f"H.*{words}"):
        H_TAKERS[taker](_W(), make())


# ------------------------------------------------- item 6: crashes become clear errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, "float32"])
def test_inverse_hessian_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        fp.inverse_hessian(torch.eye(COLS), dtype=dtype)


INPLACE_SOLVERS = {
    "sparsegpt": lambda W, **kw: fp.sparsegpt_layer(W, torch.eye(COLS), **kw),
    "rose": lambda W, **kw: fp.rose_layer(W, torch.eye(COLS), **kw),
    "wanda": lambda W, **kw: fp.wanda_layer(W, torch.eye(COLS), **kw),
    "gblm": lambda W, **kw: fp.gblm_layer(W, torch.eye(COLS), _G(), **kw),
    "magnitude": lambda W, **kw: fp.magnitude_layer(W, **kw),
}


@pytest.mark.parametrize("solver", list(INPLACE_SOLVERS))
@pytest.mark.parametrize("expand", ["rows", "cols"])
def test_inplace_on_expanded_weight(solver, expand):
    if expand == "rows":
        base = torch.randn(1, COLS)
        W = base.expand(8, COLS)
    else:
        base = torch.randn(8, 1)
        W = base.expand(8, COLS)
    before = base.clone()
    with pytest.raises(ValueError, match="inplace.*expanded"):
        INPLACE_SOLVERS[solver](W, inplace=True)
    assert torch.equal(base, before)
    INPLACE_SOLVERS[solver](W)  # not in place: an expanded W is a fine input


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16, torch.complex64, torch.bool])
def test_hessian_accumulator_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        fp.HessianAccumulator(4, dtype=dtype)


META_SOLVERS = {
    "sparsegpt": lambda W, H: fp.sparsegpt_layer(W, H),
    "rose": lambda W, H: fp.rose_layer(W, H),
    "wanda": lambda W, H: fp.wanda_layer(W, H),
    "gblm": lambda W, H: fp.gblm_layer(W, H, torch.rand(8, COLS, device="meta")),
    "magnitude": lambda W, H: fp.magnitude_layer(W),
    "magnitude(H=)": lambda W, H: fp.magnitude_layer(W, H=H),
    "sparseswaps": lambda W, H: fp.sparseswaps_layer(W, H),
    "inverse_hessian": lambda W, H: fp.inverse_hessian(H),
}


@pytest.mark.parametrize("solver", list(META_SOLVERS))
def test_meta_tensors(solver):
    W = torch.empty(8, COLS, device="meta")
    H = torch.empty(COLS, COLS, device="meta")
    with pytest.raises(ValueError, match="meta"):
        META_SOLVERS[solver](W, H)


# ------------------------------------------------- item 7: HessianAccumulator, inplace


@pytest.mark.parametrize("cols", ["8", None, 2.5, True])
def test_hessian_accumulator_cols(cols):
    with pytest.raises(TypeError, match="cols"):
        fp.HessianAccumulator(cols)


@pytest.mark.parametrize(
    "bad,exc",
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-float("inf"), ValueError),
        ("complex", TypeError),
        ("int", TypeError),
    ],
)
def test_add_batch_rejects_bad_activations(bad, exc):
    acc = fp.HessianAccumulator(4)
    acc.add_batch(torch.randn(2, 3, 4))
    H0, n0 = acc.H.clone(), acc.nsamples
    x = torch.randn(2, 3, 4)
    if bad == "complex":
        x = x.to(torch.complex64)
    elif bad == "int":
        x = x.to(torch.int64)
    else:
        x[1, 2, 0] = bad
    with pytest.raises(exc, match="inp"):
        acc.add_batch(x)
    assert acc.nsamples == n0 and torch.equal(acc.H, H0)  # H is not poisoned


@pytest.mark.parametrize("solver", list(INPLACE_SOLVERS))
@pytest.mark.parametrize("flag", ["yes", 1, None])
def test_inplace_must_be_bool(solver, flag):
    W = _W()
    before = W.clone()
    with pytest.raises(TypeError, match="inplace"):
        INPLACE_SOLVERS[solver](W, inplace=flag)
    assert torch.equal(W, before)


# ----------------------------------------------- item 8: the CLI, before loading anything


def _bytes_file(tmp_path, data: bytes):
    p = tmp_path / "calib.txt"
    p.write_bytes(data)
    return str(p)


def _existing_file(tmp_path):
    p = tmp_path / "taken"
    p.write_text("not a model")
    return str(p)


CLI_CASES = {
    "sparsity 1.5": (lambda t: ["--sparsity", "1.5"], "--sparsity"),
    "sparsity nan": (lambda t: ["--sparsity", "nan"], "--sparsity"),
    "sparsity -0.1": (lambda t: ["--sparsity", "-0.1"], "--sparsity"),
    "batch size 0": (lambda t: ["--batch-size", "0"], "--batch-size"),
    "empty calib": (lambda t: ["--calib", _bytes_file(t, b"")], "--calib"),
    "blank calib": (lambda t: ["--calib", _bytes_file(t, b" \n\t\n")], "--calib"),
    "binary calib": (lambda t: ["--calib", _bytes_file(t, bytes(range(256)) * 4)], "--calib"),
    "NUL calib": (lambda t: ["--calib", _bytes_file(t, b"\x00" * 64)], "--calib"),
    "save onto a file": (lambda t: ["--save", _existing_file(t)], "--save"),
    "save under a file": (lambda t: ["--save", _existing_file(t) + "/out"], "--save"),
    "report into a directory": (lambda t: ["--report", str(t)], "--report"),
    "report, no parent": (lambda t: ["--report", str(t / "no" / "r.json")], "--report"),
    "max swaps -1": (lambda t: ["--method", "sparseswaps", "--max-swaps", "-1"], "--max-swaps"),
    "dtype int32": (lambda t: ["--dtype", "int32"], "--dtype"),
    "device gpu": (lambda t: ["--device", "gpu"], "--device"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_flags_checked_before_loading(case, tmp_path, monkeypatch, capsys):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("fastprune.models.load_model", no_loading)
    argv, flag = CLI_CASES[case]
    assert main(["prune", *argv(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "fastprune: error:" in err and flag in err
