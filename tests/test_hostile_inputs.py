"""Hostile inputs: each is refused up front with a ValueError or
TypeError naming the argument (or flag), before any work is done or a model is loaded."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_params

import fastprune as fp
from fastprune.app.cli import main

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
    "gblm": lambda W, H: fp.gblm_layer(W, H, G=_G()),
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
    with pytest.raises(ValueError, match=rf"^H\b.*{words}"):
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
    "gblm": lambda W, **kw: fp.gblm_layer(W, torch.eye(COLS), G=_G(), **kw),
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
    "gblm": lambda W, H: fp.gblm_layer(W, H, G=torch.rand(8, COLS, device="meta")),
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


# ------------------------------- odd but legal inputs, and bad masks, on every method/backend
#
# The contract for every (method, backend, input): either a ValueError/TypeError naming the
# argument before any work (no kernel call, inputs untouched), or a result with the exact
# sparsity/pattern (each mask choice of SparseGPT/ROSE checked by `shadow` against the float64
# oracle on its inputs), pruned entries zero, a finite non-negative loss equal to tr(D H D^T)
# (fastprune.layer_loss) within 1e-4 relative, and the inputs untouched.

ROWS, BS = 8, 8  # two sparsegpt/rose blocks of 16 columns


def _solve(method, backend, W, H, G=None, **kw):
    """One call of `method`; `backend` where the method has kernels (else None)."""
    if method == "sparsegpt":
        return fp.sparsegpt_layer(W, H, blocksize=BS, backend=backend, **kw)
    if method == "rose":
        return fp.rose_layer(W, H, blocksize=BS, backend=backend, **kw)
    if method == "sparseswaps":
        return fp.sparseswaps_layer(W, H, max_swaps=3, backend=backend, **kw)
    if method == "wanda":
        return fp.wanda_layer(W, H, **kw)
    if method == "gblm":
        return fp.gblm_layer(W, H, G=torch.rand(W.shape, generator=G) if G is not None else G, **kw)
    return fp.magnitude_layer(W, H=H, **kw)


KERNEL_METHODS = ("sparsegpt", "rose", "sparseswaps")
METHOD_BACKENDS = [
    pytest.param(m, b, id=f"{m}-{b}" if b else m, marks=p.marks)
    for m in ("sparsegpt", "rose", "wanda", "gblm", "magnitude", "sparseswaps")
    for p in (backend_params() if m in KERNEL_METHODS else [pytest.param(None)])
    for b in [p.values[0]]
    if b != "cuda"
]


def _expected_pruned(method, rows, cols, sparsity, n, m, all_zero=False):
    """How many entries the method's rule prunes (N:M: rows * cols * n / m)."""
    if n:
        return rows * cols // m * n
    if sparsity == 0:
        return 0
    if method in ("sparsegpt", "rose"):  # the reference's int(numel * s) + 1 per block
        if all_zero:  # ... or every entry tied with the threshold (`score <= thresh`)
            return rows * cols
        widths = [min(BS, cols - i) for i in range(0, cols, BS)]
        return sum(min(rows * w, int(rows * w * sparsity) + 1) for w in widths)
    if method == "magnitude":  # one threshold over the whole layer
        return int(rows * cols * sparsity)
    return rows * int(cols * sparsity)  # wanda, gblm, sparseswaps: per output row


def _random_wh(gen, rows=ROWS, cols=COLS, dead=0):
    W, H, _ = fp.testing.random_layer(rows, cols, dead=dead, generator=gen)
    return W, H


def _zero_rows(gen):
    W, H = _random_wh(gen)
    W[[1, 5]] = 0
    return W, H, {}


def _zero_cols(gen):
    W, H = _random_wh(gen)
    W[:, [0, 7, 12]] = 0
    return W, H, {}


def _dead_h(gen):
    return (*_random_wh(gen, dead=3), {})


def _zero_w(gen):
    W, H = _random_wh(gen)
    return torch.zeros_like(W), H, {}


def _sparsity(s):
    return lambda gen: (*_random_wh(gen), {"sparsity": s})


def _one_row(gen):
    return (*_random_wh(gen, rows=1), {})


def _one_col(gen):
    W, H = _random_wh(gen, cols=4)
    return W[:, :1].clone(), H[:1, :1].clone(), {}


def _transposed(gen):
    """W a transposed view, H a strided view into a bigger matrix (both non-contiguous)."""
    W, H = _random_wh(gen)
    big = torch.zeros(2 * COLS, 2 * COLS)
    big[::2, ::2] = H
    return W.t().contiguous().t(), big[::2, ::2], {}


def _half(dtype):
    def make(gen):
        W, H = _random_wh(gen)
        return W.to(dtype), H, {}

    return make


ODD_INPUTS = {
    "zero rows of W": _zero_rows,
    "zero columns of W": _zero_cols,
    "dead H columns": _dead_h,
    "all-zero W": _zero_w,
    "sparsity 0": _sparsity(0.0),
    "sparsity 0.9": _sparsity(0.9),
    "sparsity 1-1e-6": _sparsity(1 - 1e-6),
    "1-row layer": _one_row,
    "1-column layer": _one_col,
    "non-contiguous W and H": _transposed,
    "float16 W": _half(torch.float16),
    "bfloat16 W": _half(torch.bfloat16),
}

LOSS_RTOL = {torch.float32: 1e-4, torch.float64: 1e-4}
"""r.loss vs tr(D H D^T) of the returned weights. A half-precision W is solved in float32 and
its loss is the float32 solve's (SparseGPT/ROSE): the rounding of the returned weights to
W.dtype moves tr(D H D^T) by a few units of that rounding, so 1e-4 + 2 units there."""
LOSS_RTOL.update({torch.float16: 1e-4 + 2 * 2.0**-10, torch.bfloat16: 1e-4 + 2 * 2.0**-7})


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every op a `Kernels` runs (to tell that an error came before any work)."""
    from fastprune.ops import Kernels

    calls: list[str] = []
    run = Kernels.__call__

    def counted(self, op, *args, **kwargs):
        calls.append(op)
        return run(self, op, *args, **kwargs)

    monkeypatch.setattr(Kernels, "__call__", counted)
    return calls


def _check_result(r, method, W, H, sparsity, n, m):
    rows, cols = W.shape
    assert r.weight.shape == W.shape and r.weight.dtype == W.dtype
    assert r.mask.dtype == torch.bool and r.mask.shape == W.shape
    assert torch.isfinite(r.weight).all()
    assert (r.weight[~r.mask] == 0).all(), "a pruned entry is not zero"
    pruned = int((~r.mask).sum())
    want = _expected_pruned(method, rows, cols, sparsity, n, m, not W.any())
    if method in ("sparsegpt", "rose") and not n and sparsity:
        # `score <= sorted[k]` also prunes the exact ties of the threshold (frequent in half
        # precision); `shadow` holds each block's mask to that rule on its scores
        assert pruned >= want, f"{pruned} pruned, the rule at least {want}"
    else:
        assert pruned == want, f"{pruned} pruned, the rule {want}"
    if n:
        assert fp.check_nm_keep_mask(r.mask, n, m)
    assert r.loss is not None and math.isfinite(r.loss) and r.loss >= 0, r.loss
    truth = fp.layer_loss(W, r.weight, H)
    scale = fp.layer_loss(W, torch.zeros_like(W), H)  # the loss of pruning everything
    tol = LOSS_RTOL[W.dtype] * abs(truth) + 1e-6 * scale + 1e-30
    assert abs(r.loss - truth) <= tol, f"loss {r.loss!r}, tr(D H D^T) {truth!r}"


@pytest.mark.parametrize("method,backend", METHOD_BACKENDS)
@pytest.mark.parametrize("case", list(ODD_INPUTS))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_odd_inputs_give_exact_results(method, backend, case, pattern, gen, kernel_calls, shadow):
    W, H, kw = ODD_INPUTS[case](gen)
    n, m = (2, 4) if pattern == "2:4" else (0, 0)
    sparsity = kw.pop("sparsity", 0.5)
    W0, H0 = W.clone(), H.clone()
    args = dict(sparsity=sparsity, prune_n=n, prune_m=m, **kw)
    if n and W.shape[1] % m:  # a 1-column layer has no 2:4 groups
        with pytest.raises(ValueError, match=r"^prune_m\b"):
            _solve(method, backend, W, H, gen, **args)
        assert not kernel_calls
    else:
        r = _solve(method, backend, W, H, gen, **args)
        _check_result(r, method, W0, H0, 0.5 if n else sparsity, n, m)
        if method in ("sparsegpt", "rose"):
            assert shadow.get("obs_sweep", 0) >= 1 or not sparsity, "no mask choice checked"
        if backend:
            assert r.info["backend"] == backend
    assert torch.equal(W, W0) and torch.equal(H, H0), "an input was modified"


def _bad_masks():
    keep = torch.rand(ROWS, COLS, generator=torch.Generator().manual_seed(3)) < 0.5
    return {
        "float mask": (keep.float(), TypeError),
        "uint8 mask": (keep.to(torch.uint8), TypeError),
        "int64 mask": (keep.long(), TypeError),
        "list mask": (keep.tolist(), TypeError),
        "transposed shape": (torch.ones(COLS, ROWS, dtype=torch.bool), ValueError),
        "one row short": (keep[:-1], ValueError),
        "1-D mask": (keep.flatten(), ValueError),
        "3-D mask": (keep[None], ValueError),
    }


@pytest.mark.parametrize(
    "method,backend",
    [p for p in METHOD_BACKENDS if p.values[0] in ("sparsegpt", "sparseswaps")],
)
@pytest.mark.parametrize("case", list(_bad_masks()))
def test_bad_mask_refused_before_any_work(method, backend, case, gen, kernel_calls):
    mask, exc = _bad_masks()[case]
    W, H = _random_wh(gen)
    W0, H0 = W.clone(), H.clone()
    with pytest.raises(exc, match=r"^mask\b"):
        _solve(method, backend, W, H, mask=mask)
    assert not kernel_calls, f"kernels ran before the error: {kernel_calls}"
    assert torch.equal(W, W0) and torch.equal(H, H0)
