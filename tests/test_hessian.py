"""Hessian accumulation, damping, dead columns and the robust inverse."""

import pytest
import torch
from conftest import assert_weights_agree_where_masks_do, relative_error
from op_oracles import check_obs_solve

import fastprune as fp
from fastprune.hessian import upper_triangular_inverse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shapes", [[(2, 7, 13)], [(7, 13), (3, 5, 13), (11, 13)]])
def test_accumulator_matches_definition(gen, dtype, shapes):
    """H = 2/n sum_t x_t x_t^T with n counting samples (a 2-D batch is one sample)."""
    xs = [torch.randn(*s, generator=gen).to(dtype) for s in shapes]
    acc = fp.HessianAccumulator(13)
    for x in xs:
        acc.add_batch(x)
    n = sum(1 if x.dim() == 2 else x.shape[0] for x in xs)
    flat = torch.cat([x.reshape(-1, 13).double() for x in xs])
    expected = 2 / n * flat.t() @ flat
    assert acc.nsamples == n
    assert acc.H.dtype == torch.float32
    torch.testing.assert_close(acc.H.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.scaler_row, torch.diagonal(acc.H) / 2)


def test_accumulator_reproduces_reference_running_update(gen):
    """Same arithmetic as SparseGPT's add_batch (rescale, then sqrt(2/n)-scaled inputs)."""
    import math

    xs = [torch.randn(4, 9, 6, generator=gen) for _ in range(3)]
    H = torch.zeros(6, 6)
    n = 0
    for x in xs:
        inp = x.reshape(-1, 6).t()
        H *= n / (n + x.shape[0])
        n += x.shape[0]
        inp = math.sqrt(2 / n) * inp.float()
        H += inp.matmul(inp.t())
    acc = fp.HessianAccumulator(6)
    for x in xs:
        acc.add_batch(x)
    assert torch.equal(acc.H, H)


def test_accumulator_bad_input():
    acc = fp.HessianAccumulator(5)
    with pytest.raises(ValueError, match="inp"):
        acc.add_batch(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="inp"):
        acc.add_batch([1, 2, 3])
    with pytest.raises(ValueError, match="batches"):
        fp.accumulate_hessian([])


def test_inverse_is_upper_cholesky_of_damped_inverse(gen):
    W, H, _ = fp.testing.random_layer(4, 24, generator=gen)
    inv = fp.inverse_hessian(H, 0.01)
    U = inv.hinv.double()
    assert torch.equal(U, U.triu())
    damp = 0.01 * torch.diagonal(H).mean()
    Hd = H.double() + damp * torch.eye(24, dtype=torch.float64)
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(Hd), rtol=1e-3, atol=1e-6)
    assert inv.retries == 0 and inv.as_info()["dead_columns"] == 0


def test_singular_hessian_is_retried_and_reported(gen):
    """Rank-deficient H with no damping cannot be factored: retried, reported, no crash."""
    x = torch.randn(1, 3, 16, generator=gen)  # rank 3 << 16
    H = fp.accumulate_hessian([x])
    inv = fp.inverse_hessian(H, percdamp=0.0)
    assert inv.retries >= 1 and inv.percdamp > 0
    assert torch.isfinite(inv.hinv).all()
    W = torch.randn(5, 16, generator=gen)
    r = fp.sparsegpt_layer(W, H, percdamp=0.0)
    assert r.info["damp_retries"] >= 1
    assert torch.isfinite(r.weight).all()


def test_dead_columns(gen):
    W, H, X = fp.testing.random_layer(8, 32, dead=5, generator=gen)
    inv = fp.inverse_hessian(H)
    assert inv.as_info()["dead_columns"] == 5
    r = fp.sparsegpt_layer(W, H, blocksize=16)
    dead = torch.diagonal(H) == 0
    assert (r.weight[:, dead] == 0).all()
    assert torch.isfinite(r.weight).all()


def test_not_psd_raises_naming_H():
    H = -torch.eye(4)
    H[0, 0] = 1.0
    with pytest.raises(ValueError, match=r"^H is not positive semi-definite"):
        fp.inverse_hessian(H)


def _spd(gen, n: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """A Gram-like `H`: "random" (2/T X X^T, T = 2n+8), "ill" (eigenvalues log-spaced over
    1e-6..1 in a random basis) or "dead" (random, a quarter of the channels all zero)."""
    if kind == "ill":
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        H = (Q * torch.logspace(-6, 0, n, dtype=torch.float64)) @ Q.t()
        H = (H + H.t()) / 2
    else:
        X = torch.randn(n, 2 * n + 8, generator=gen, dtype=torch.float64)
        H = 2 / X.shape[1] * X @ X.t()
        if kind == "dead":
            d = torch.randperm(n, generator=gen)[: max(1, n // 4)]
            H[d, :] = 0
            H[:, d] = 0
    return H.to(dtype)


def _damped64(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """The damped `H` of `inverse_hessian` (dead diagonal set to 1), in float64."""
    Hd = H.double().clone()
    diag = torch.diagonal(Hd)
    diag[diag == 0] = 1
    return Hd + percdamp * diag.mean() * torch.eye(H.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("method", fp.hessian.INVERSE_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["random", "ill", "dead"])
@pytest.mark.parametrize("n", [1, 7, 64, 257])
def test_inverse_against_float64_truth(gen, method, dtype, kind, n):
    """`U^T U = (H + damp I)^-1`, `U` upper with positive diagonal, in H's precision: 1e-5
    (float32) or 1e-10 (float64) relative, or the inverse's own forward-error bound
    `2 cond(H_damped) eps` where that is larger (float32, eigenvalues down to 1e-6: cond ~1e3
    after damping, and both methods land at ~1-3e-5)."""
    H = _spd(gen, n, kind, dtype)
    H0 = H.clone()
    inv = fp.inverse_hessian(H, 0.01, method=method)
    assert torch.equal(H, H0)  # not mutated
    U = inv.hinv
    assert U.dtype == dtype and U.shape == (n, n)
    assert torch.equal(U, U.triu()) and (U.diagonal() > 0).all()
    assert inv.retries == 0 and inv.percdamp == 0.01
    assert inv.as_info()["dead_columns"] == (max(1, n // 4) if kind == "dead" else 0)
    Hd = _damped64(H)
    truth = torch.linalg.inv(Hd)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    tol = max(tol, 2 * torch.linalg.cond(Hd).item() * torch.finfo(dtype).eps)
    U = U.double()
    assert relative_error(U.t() @ U, truth) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [1, 7, 64, 257])
def test_direct_matches_reference_factor(gen, dtype, n):
    """The upper Cholesky factor of H^-1 is unique: both arithmetics give it, to 1e-4."""
    H = _spd(gen, n, "random", dtype)
    a = fp.inverse_hessian(H, 0.01)
    b = fp.inverse_hessian(H, 0.01, method="reference")
    assert relative_error(a.hinv, b.hinv) <= 1e-4
    assert (a.damp, a.percdamp, a.retries) == (b.damp, b.percdamp, b.retries)
    assert torch.equal(a.dead, b.dead)


@pytest.mark.parametrize("n", [1, 7, 64, 257])
@pytest.mark.parametrize("leaf", [1, 4, 256])
def test_upper_triangular_inverse(gen, n, leaf):
    """`R^-1` by halves (corner `-A^-1 B C^-1`) is upper triangular and inverts `R`."""
    # a Cholesky factor (a random triangular matrix is exponentially ill-conditioned)
    R = torch.linalg.cholesky(_spd(gen, n, "random", torch.float64), upper=True)
    R0 = R.clone()
    Ri = upper_triangular_inverse(R, leaf)
    assert torch.equal(R, R0)
    assert torch.equal(Ri, Ri.triu())
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(Ri @ R, eye, rtol=0, atol=1e-10)


@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)])
def test_sparsegpt_masks_direct_vs_reference(gen, pattern):
    """The layer solve with either inverse is the research loop on that inverse along its
    own mask (every decision the rule's up to near-ties), and the two agree within 1e-4 on
    every row whose masks agree."""
    n, m = pattern
    W, H, _ = fp.testing.random_layer(64, 512, dead=3, generator=gen)
    a = fp.sparsegpt_layer(W, H, 0.5, n, m, blocksize=128)
    b = fp.sparsegpt_layer(W, H, 0.5, n, m, blocksize=128, inverse_method="reference")
    check_obs_solve(a, W, H, 0.5, n, m, 128, method="direct", what="direct")
    check_obs_solve(b, W, H, 0.5, n, m, 128, method="reference", what="reference")
    assert_weights_agree_where_masks_do(a.weight, b.weight, a.mask, b.mask, 1e-4)
    assert a.info["damp"] == b.info["damp"] and a.info["dead_columns"] == 3


@pytest.mark.parametrize("method", fp.hessian.INVERSE_METHODS)
def test_singular_hessian_retries_with_either_method(gen, method):
    x = torch.randn(1, 3, 16, generator=gen)  # rank 3 << 16
    H = fp.accumulate_hessian([x])
    H0 = H.clone()
    inv = fp.inverse_hessian(H, percdamp=0.0, method=method)
    assert torch.equal(H, H0)
    assert inv.retries >= 1 and inv.percdamp > 0 and inv.damp > 0
    assert inv.as_info()["damp_retries"] == inv.retries
    assert torch.isfinite(inv.hinv).all()
    W = torch.randn(5, 16, generator=gen)
    r = fp.sparsegpt_layer(W, H, percdamp=0.0, inverse_method=method)
    assert r.info["damp_retries"] >= 1 and r.info["damp"] > 0
    r = fp.rose_layer(W, H, percdamp=0.0, blocksize=4, inverse_method=method)
    assert r.info["damp_retries"] >= 1


def test_inverse_method_checked_and_float64_requested(gen):
    H = _spd(gen, 9, "random", torch.float32)
    with pytest.raises(ValueError, match="method"):
        fp.inverse_hessian(H, method="cholesky")
    with pytest.raises(ValueError, match="method"):
        fp.sparsegpt_layer(torch.randn(3, 9), H, inverse_method="nope")
    inv = fp.inverse_hessian(H, dtype=torch.float64)
    assert inv.hinv.dtype == torch.float64
    assert fp.inverse_hessian(H.bfloat16()).hinv.dtype == torch.float32


def test_layer_loss_is_trace_form(gen):
    W, H, X = fp.testing.random_layer(6, 10, generator=gen)
    Wp = W * (torch.rand(W.shape, generator=gen) > 0.5)
    D = (W - Wp).double()
    expected = torch.trace(D @ H.double() @ D.t()).item()
    assert fp.layer_loss(W, Wp, H) == pytest.approx(expected, rel=1e-5)


def _half_activations(gen, dtype, batches=4, tokens=96, cols=40):
    """LLM-like half-precision activations: a few outlier channels 30x the rest."""
    scale = torch.ones(cols)
    scale[torch.randperm(cols, generator=gen)[:3]] = 30.0
    return [(torch.randn(2, tokens, cols, generator=gen) * scale).to(dtype) for _ in range(batches)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fast_precision_against_float64_truth(gen, dtype):
    """The "fast" arithmetic (half-precision products accumulated in float32, 2/n applied to
    the product) and the reference's both land within float32 rounding of the float64 H of
    the same half-precision inputs, and within ~1e-6 of each other."""
    xs = _half_activations(gen, dtype)
    flat = torch.cat([x.reshape(-1, 40).double() for x in xs])
    truth = 2 / (2 * len(xs)) * flat.t() @ flat
    got = {}
    for precision in ("exact", "fast"):
        acc = fp.HessianAccumulator(40, precision=precision)
        for x in xs:
            acc.add_batch(x)
        assert acc.H.dtype == torch.float32 and acc.nsamples == 2 * len(xs)
        got[precision] = acc.H.double()
        err = (got[precision] - truth).norm() / truth.norm()
        assert err < 2e-6, f"{precision}: relative error {err:.2e} against float64"
    diff = (got["fast"] - got["exact"]).norm() / truth.norm()
    assert diff < 2e-6, f"fast vs exact: {diff:.2e}"


def test_auto_precision_is_the_reference_on_cpu(gen):
    """On the CPU "auto" is the reference's arithmetic, bit for bit, for half inputs too."""
    xs = _half_activations(gen, torch.bfloat16)
    a, e = fp.HessianAccumulator(40), fp.HessianAccumulator(40, precision="exact")
    for x in xs:
        a.add_batch(x)
        e.add_batch(x)
    assert torch.equal(a.H, e.H)


def _row_losses(W, Wp, H):
    D = (W - Wp).double()
    return ((D @ H.double()) * D).sum(1)


def test_fast_hessian_gives_the_same_masks(gen):
    """SparseGPT on the fast H prunes as it does on the reference's H: each solve is the
    research loop along its own mask (flips only at float32 near-ties), weights and losses
    equal on every row whose masks agree."""
    xs = _half_activations(gen, torch.float16, batches=8, tokens=128, cols=64)
    Hs = {}
    for precision in ("exact", "fast"):
        acc = fp.HessianAccumulator(64, precision=precision)
        for x in xs:
            acc.add_batch(x)
        Hs[precision] = acc.H
    W = torch.randn(48, 64, generator=gen)
    for n, m in ((0, 0), (2, 4)):
        a = fp.sparsegpt_layer(W, Hs["exact"], prune_n=n, prune_m=m, blocksize=32)
        b = fp.sparsegpt_layer(W, Hs["fast"], prune_n=n, prune_m=m, blocksize=32)
        check_obs_solve(a, W, Hs["exact"], 0.5, n, m, 32, what=f"{n}:{m} exact H")
        check_obs_solve(b, W, Hs["fast"], 0.5, n, m, 32, what=f"{n}:{m} fast H")
        rows = assert_weights_agree_where_masks_do(a.weight, b.weight, a.mask, b.mask, 1e-4)
        la = _row_losses(W, a.weight, Hs["exact"])[rows].sum().item()
        lb = _row_losses(W, b.weight, Hs["exact"])[rows].sum().item()
        assert lb == pytest.approx(la, rel=1e-4), f"{n}:{m}: losses on rows whose masks agree"


def test_precision_argument_is_checked():
    with pytest.raises(ValueError, match="precision"):
        fp.HessianAccumulator(4, precision="tf32")
    with pytest.raises(ValueError, match="precision"):
        fp.hessian.running_hessian_update(torch.zeros(2, 2), 0, torch.ones(2, 3).half(), 1, "x")
