"""One oracle per op, and the check every backend's output of that op must pass.

Each oracle is the op's contract (`fastprune/ops/<op>.py`) written out plainly in float64
(the truth), independent of the backends' code: the column-by-column research loop for
`obs_sweep`, the sorted-block threshold for `block_prune_mask` and `column_losses`, the
exhaustive search over all pairs for `swap_search`, the rank-2 update for `swap_apply`. The
`check_<op>(out, *args)` functions compare one call's output with the oracle on the same
inputs, with the tolerances of conftest's table; `CHECKS` maps op -> check (used per op in
tests/ops and on every kernel call of a solve in tests/test_backends.py).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from conftest import (
    NEAR_TIE_RTOL,
    OP_RTOL,
    assert_close,
    assert_close_to_scale,
    state_dtype,
)

from fastprune.hessian import inverse_hessian
from fastprune.masks import check_nm_keep_mask, nm_prune_mask
from fastprune.ops.obs_sweep import ObsSweep
from fastprune.testing import random_layer

NEAR_TIE_NOTE = (
    "The exactness rule (docs/semantics.md) allows a mask entry to differ from the float64 "
    "oracle's only where two scores are within float32 rounding of each other (a near-tie)"
)

PATTERNS = {"unstructured": (0, 0), "fixed": (0, 0), "2:4": (2, 4), "4:8": (4, 8)}


# ---------------------------------------------------------------------------- inputs


def layer(gen, rows, cols, kind="plain", blocksize=32, dtype=torch.float32, dead=0):
    """`(W, H)` of a random layer; kind: plain, columnar (ROSE reorders) or ill
    (ill-conditioned H)."""
    W, H, _ = random_layer(
        rows,
        cols,
        columnar=kind == "columnar",
        ill_conditioned=kind == "ill",
        blocksize=blocksize,
        dead=dead,
        generator=gen,
    )
    return W.to(dtype), H


def sweep_block(gen, rows, count, kind="plain", dtype=torch.float32):
    """A block `W1 [rows, count]` and its `Hinv1`, sliced from the middle of a wider layer
    (strided views, as the driver passes them)."""
    W, H = layer(gen, rows, count + 16, kind, blocksize=max(count, 1))
    hinv = inverse_hessian(H, 0.01).hinv
    W = W.to(dtype)
    return W[:, 8 : 8 + count], hinv[8 : 8 + count, 8 : 8 + count]


def random_keep(gen, rows, cols, p_keep=0.5, n=0, m=0):
    """A random keep-mask (N:M if n > 0)."""
    if n:
        return ~nm_prune_mask(torch.rand(rows, cols, generator=gen), n, m)
    return torch.rand(rows, cols, generator=gen) < p_keep


def swap_state(gen, rows, cols, n=0, m=0, sparsity=0.5, dtype=torch.float32, **kw):
    """`(w, keep, c, H)` of a random layer with a random keep-mask and `c = (w*~keep) @ H`."""
    W, H, _ = random_layer(rows, cols, generator=gen, **kw)
    keep = random_keep(gen, rows, cols, 1 - sparsity, n, m)
    W, H = W.to(dtype), H.to(dtype)
    return W, keep, (W * ~keep) @ H, H


# ------------------------------------------------------------------------- obs_sweep


class SweepOracle(NamedTuple):
    q: torch.Tensor
    err: torch.Tensor
    keep: torch.Tensor
    loss_rows: torch.Tensor
    score: torch.Tensor  # N:M: each entry's score when its group chose (forced: -1)
    score_mag: torch.Tensor  # the score's magnitude: (|w| + sum |updates|)^2 / d^2


def _lowest_n_stable(s: torch.Tensor, n: int) -> torch.Tensor:
    """True for the n lowest of each row of `s` (a lower column wins an exact tie)."""
    idx = torch.sort(s, dim=1, stable=True).indices[:, :n]
    return torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)


def oracle_obs_sweep(
    W1, Hinv1, keep1, n=0, m=0, follow=None, quant=None, follow_grid=None, tol=0.0
) -> SweepOracle:
    """The research loop in float64: column by column, one rank-1 update of the rest.

    N:M groups choose from the updated weights when the sweep reaches them (`keep1`'s False
    entries forced: score -1, before every real score, always pruned). With `follow` (a
    keep-mask) the groups take `follow`'s choice instead, so the scores every group of a
    backend's sweep saw can be
    recorded along that backend's own path.

    `quant` (a `QuantBlock`): each kept weight rounded to its group's grid (`oracle_grid`,
    `oracle_round`), found at the group's first column from the updated weights with `find`.
    With `follow_grid` (a backend's `(q, scale, zero)`) the oracle takes the backend's grid
    and rounding wherever its own differ only by a near-tie (within `tol` of the magnitude
    the backend computed from); a difference that is no near-tie raises."""
    W = W1.detach().double().cpu().clone()
    H = Hinv1.detach().double().cpu()
    rows, count = W.shape
    d = H.diagonal()
    mag = W.abs()
    score = torch.zeros_like(W)
    score_mag = torch.zeros_like(W)
    if n:
        forced = torch.zeros_like(W, dtype=torch.bool) if keep1 is None else ~keep1.cpu()
        prune = torch.zeros_like(W, dtype=torch.bool)
    else:
        prune = ~keep1.cpu()
    Q, E = torch.zeros_like(W), torch.zeros_like(W)
    if quant is not None:
        gs = quant.group_size
        scale = quant.scale.detach().double().cpu().clone()
        zero = quant.zero.detach().double().cpu().clone()
        ties = 0
        err_mag = torch.zeros_like(W)
    for i in range(count):
        if n and i % m == 0:
            g = slice(i, i + m)
            s = (W[:, g] ** 2 / d[g] ** 2).masked_fill(forced[:, g], -1)
            score[:, g] = s
            score_mag[:, g] = mag[:, g] ** 2 / d[g] ** 2
            if follow is None:
                prune[:, g] = _lowest_n_stable(s, n) | forced[:, g]
            else:
                prune[:, g] = ~follow[:, g].cpu()
        w = W[:, i]
        q = w.masked_fill(prune[:, i], 0)
        if quant is not None:
            err_mag[:, i] = mag[:, i] / d[i]
            g = i // gs
            if quant.find and i % gs == 0:
                cols = slice(i, i + gs)
                scale[:, g], zero[:, g] = oracle_grid(W[:, cols], quant)
                if follow_grid is not None:
                    _follow_found_grid(scale, zero, follow_grid, g, W[:, cols], mag[:, cols], tol)
            x = q / scale[:, g]
            level = oracle_round(x, zero[:, g], quant)
            if follow_grid is not None:
                fq, fs = follow_grid[0][:, i].double().cpu(), follow_grid[1][:, g].double().cpu()
                theirs = fq / fs
                if quant.fp8:
                    theirs = theirs.to(torch.float8_e4m3fn).double()
                else:
                    theirs = theirs.round()
                differ = theirs != level
                if differ.any():  # a near-tie: both levels (about) equally near x
                    slack = tol * (mag[:, i] / scale[:, g] + x.abs() + 1) + 1e-12
                    gap = (x - theirs).abs() - (x - level).abs()
                    far = differ & (gap > slack)
                    assert not far.any(), (
                        f"column {i}: rows {far.nonzero().flatten()[:5].tolist()} round "
                        f"{x[far][:5].tolist()} to {theirs[far][:5].tolist()}, the nearest "
                        f"level is {level[far][:5].tolist()}; {NEAR_TIE_NOTE}"
                    )
                    ties += int(differ.sum())
                    level = torch.where(differ, theirs, level)
            q = level * scale[:, g]
        err = (w - q) / d[i]
        Q[:, i], E[:, i] = q, err
        W[:, i + 1 :] -= err[:, None] * H[i, i + 1 :]
        mag[:, i + 1 :] += err.abs()[:, None] * H[i, i + 1 :].abs()
    out = SweepOracle(Q, E, ~prune, (E * E).sum(1) / 2, score, score_mag)
    if quant is not None:
        return QuantOracle(*out, scale, zero, ties, err_mag)
    return out


class QuantOracle(NamedTuple):
    q: torch.Tensor
    err: torch.Tensor
    keep: torch.Tensor
    loss_rows: torch.Tensor
    score: torch.Tensor
    score_mag: torch.Tensor
    scale: torch.Tensor  # [rows, G] the grids used
    zero: torch.Tensor
    ties: int  # rounding near-ties where the oracle took the followed backend's level
    err_mag: torch.Tensor  # the magnitude each err was computed from: (|w| + sum |updates|) / d


def oracle_grid(W, quant):
    """GPTQ's `find_params(weight=True)` per row of `W [rows, g]`, written out in float64;
    fp8: `max|w| / 448` (1 for a zero row), zero 0."""
    W = W.double()
    if quant.fp8:
        amax = W.abs().amax(1)
        return torch.where(amax > 0, amax / 448, 1.0), torch.zeros_like(amax)
    xmin = W.amin(1).clamp(max=0)
    xmax = W.amax(1).clamp(min=0)
    if quant.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / quant.maxq
    if quant.sym:
        return scale, torch.full_like(scale, (quant.maxq + 1) / 2)
    return scale, torch.round(-xmin / scale)


def oracle_round(x, zero, quant):
    """The level `x = w / scale` rounds to, in units of scale: `clamp(round(x) + zero, 0,
    maxq) - zero`; fp8: x as float8 e4m3 (saturating at 448)."""
    if quant.fp8:
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).double()
    return torch.clamp(torch.round(x) + zero, 0, quant.maxq) - zero


def _follow_found_grid(scale, zero, follow_grid, g, Wg, magg, tol):
    """Take a backend's grid found in the sweep: its scale within `tol` of the magnitude it
    was found from, its asymmetric zero point the oracle's or a near-tie of it."""
    fs, fz = (t[:, g].double().cpu() for t in follow_grid[1:])
    top = magg.amax(1).clamp_min(1e-300)
    bad = (fs - scale[:, g]).abs() > 4 * tol * top + 1e-300
    assert not bad.any(), (
        f"group {g}: the grid found in the sweep has scale {fs[bad][:3].tolist()}, the "
        f"oracle {scale[bad, g][:3].tolist()}"
    )
    differ = fz != zero[:, g]
    if differ.any():
        x = -Wg.amin(1).clamp(max=0) / scale[:, g]
        frac = (x - x.floor() - 0.5).abs()
        near = frac <= tol * (top / scale[:, g] + 1)
        far = differ & (((fz - zero[:, g]).abs() > 1) | ~near)
        assert not far.any(), f"group {g}: zero points {fz[far][:3].tolist()} are no near-tie"
    scale[:, g], zero[:, g] = fs, fz


def assert_groups_near_optimal(keep, oracle: SweepOracle, keep1, n, m, tol, what="keep"):
    """Every N:M group of `keep` prunes what the contract's rule prunes on the scores the
    group saw (its forced entries and the n lowest), up to near-ties."""
    rows, count = keep.shape
    G = count // m
    keep = keep.cpu().reshape(rows, G, m)
    s = oracle.score.reshape(rows, G, m)
    smag = oracle.score_mag.reshape(rows, G, m)
    forced = torch.zeros_like(keep) if keep1 is None else (~keep1.cpu()).reshape(rows, G, m)
    assert not (keep & forced).any(), f"{what}: an entry keep1 forces pruned is kept"
    # the count the rule prunes: the n lowest (forced rank first, as -1) united with the forced
    rule = _lowest_n_stable(s.reshape(-1, m), n).reshape(rows, G, m) | forced
    want, got = rule.sum(-1), (~keep).sum(-1)
    bad = (want != got).nonzero()[:5].tolist()
    assert not bad, f"{what}: groups (row, group) {bad} prune {got} entries, the rule {want}"
    # pruned (not forced) a vs kept b: s_a <= s_b unless the two are a near-tie
    a = (~keep & ~forced)[..., :, None] & keep[..., None, :]
    gap = s[..., :, None] - s[..., None, :]
    slack = tol * (smag[..., :, None] + smag[..., None, :]) + 1e-300
    worse = a & (gap > slack)
    if worse.any():
        r, g, i, j = worse.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: row {r} group {g} prunes column {g * m + i} (score {s[r, g, i]:.9g}) "
            f"and keeps column {g * m + j} (score {s[r, g, j]:.9g}): gap "
            f"{(gap / slack)[r, g, i, j]:.3g}x the near-tie tolerance; {NEAR_TIE_NOTE}; "
            f"{int(worse.sum())} such pairs"
        )


def check_obs_sweep(out, W1, Hinv1, keep1, prune_n=0, prune_m=0, what="obs_sweep", quant=None):
    """One obs_sweep output against the float64 oracle on the same inputs.

    Unstructured/fixed: the mask is keep1 exactly. N:M: every group's choice is the
    contract's rule on the scores it saw along the backend's own mask up to near-ties (how
    many near-ties a draw holds, and so how far the mask drifts from the free oracle's, is
    not asserted: it depends on the draw), and the forced entries are pruned. Values: q, err,
    loss_rows within OP_RTOL (scale-relative) of the oracle swept along that mask. The
    batched form (`W1 [E, rows, count]`) is checked layer by layer, each against the oracle
    of its own `W1[e]`, `Hinv1[e]`, `keep1[e]`."""
    n, m = prune_n, prune_m
    if W1.dim() == 3:
        assert len(out) == 4 and all(t.shape[0] == W1.shape[0] for t in out), (
            f"{what}: every output of the batched form has the leading E = {W1.shape[0]}"
        )
        for e in range(W1.shape[0]):
            k1 = None if keep1 is None else keep1[e]
            layer_out = tuple(t[e] for t in out)
            qe = None
            if quant is not None:
                layer_out = ObsSweep(*layer_out, out.scale[e], out.zero[e])
                qe = quant._replace(scale=quant.scale[e], zero=quant.zero[e])
            check_obs_sweep(
                layer_out, W1[e], Hinv1[e], k1, n, m, what=f"{what} layer {e}", quant=qe
            )
        return
    if quant is not None:
        return _check_quant_sweep(out, W1, Hinv1, keep1, n, m, what, quant)
    q, err, keep, loss = out
    state = state_dtype(W1, Hinv1)
    assert q.dtype == err.dtype == loss.dtype == state, (
        f"{what}: outputs {q.dtype}/{err.dtype}/{loss.dtype}, the contract says {state}"
    )
    assert keep.dtype == torch.bool and keep.shape == W1.shape and q.shape == W1.shape
    assert loss.shape == (W1.shape[0],)
    keep = keep.cpu()
    if n:
        ref = oracle_obs_sweep(W1, Hinv1, keep1, n, m, follow=keep)
        assert_groups_near_optimal(keep, ref, keep1, n, m, NEAR_TIE_RTOL[state], what)
    else:
        assert torch.equal(keep, keep1.cpu()), f"{what}: the mask must be keep1 as given"
        ref = oracle_obs_sweep(W1, Hinv1, keep1)
    rtol = OP_RTOL[state]
    assert_close_to_scale(q, ref.q, rtol, f"{what} q")
    assert_close_to_scale(err, ref.err, rtol, f"{what} err")
    assert_close_to_scale(loss, ref.loss_rows, rtol, f"{what} loss_rows")


def _check_quant_sweep(out, W1, Hinv1, keep1, n, m, what, quant):
    """A quantized sweep against the oracle swept along the backend's mask, grid and
    rounding (each taken only at a near-tie): the mask as without quant, the grids used
    (`out.scale`, `out.zero`: the given ones, or found within rounding), every kept weight
    on its grid and every pruned one exactly 0, the values within OP_RTOL."""
    q, err, keep, loss = out
    state = state_dtype(W1, Hinv1)
    assert out.scale is not None and out.zero is not None, f"{what}: no grids returned"
    G = quant.scale.shape[-1]
    assert out.scale.shape == out.zero.shape == (W1.shape[0], G), f"{what}: grid shape"
    assert q.dtype == err.dtype == loss.dtype == state, f"{what}: outputs {q.dtype}"
    keep = keep.cpu()
    if n:  # with forced entries a group prunes max(n, forced): assert_groups_near_optimal
        assert keep1 is not None or check_nm_keep_mask(keep, n, m), f"{what}: not {n}:{m}"
        if keep1 is not None:
            assert not (keep & ~keep1.cpu()).any(), f"{what}: a forced entry is kept"
    else:
        assert torch.equal(keep, keep1.cpu()), f"{what}: the mask must be keep1 as given"
    if not quant.find:
        assert torch.equal(out.scale.cpu().to(state), quant.scale.cpu().to(state)), (
            f"{what}: a static grid must be used as given"
        )
        assert torch.equal(out.zero.cpu().to(state), quant.zero.cpu().to(state))
    assert (q.cpu()[~keep] == 0).all(), f"{what}: a pruned weight must be exactly 0"
    tol = NEAR_TIE_RTOL[state]
    grid = (q, out.scale, out.zero)
    ref = oracle_obs_sweep(W1, Hinv1, keep1, n, m, keep, quant, grid, tol)
    if n:
        assert_groups_near_optimal(keep, ref, keep1, n, m, tol, what)
    rtol = OP_RTOL[state]
    assert_close_to_scale(out.scale, ref.scale, rtol, f"{what} scale")
    assert_close_to_scale(q, ref.q, rtol, f"{what} q")
    # every kept weight leaves an error (w - q) / d, small beside the w / d it came from:
    # within rtol of that magnitude, as a pruned weight's error is
    atol = rtol * (ref.err_mag + ref.err.abs().max())
    assert_close(err, ref.err, rtol, atol, f"{what} err")
    loss_mag = (ref.err_mag * ref.err_mag).sum(1) / 2
    assert_close(
        loss, ref.loss_rows, rtol, 4 * rtol * (loss_mag + ref.loss_rows.max()), f"{what} loss_rows"
    )
    return ref


# ------------------------------------------------------------------ block_prune_mask


def oracle_block_prune_mask(W1, hinv_diag, sparsity):
    """`(keep, score, threshold)`: float64 scores, keep `score > sorted(score)[k]`."""
    s = W1.detach().double().cpu() ** 2 / hinv_diag.detach().double().cpu().reshape(1, -1) ** 2
    k = int(s.numel() * sparsity)
    thr = torch.sort(s.flatten()).values[k]
    return s > thr, s, thr


def check_block_prune_mask(keep, W1, hinv_diag, sparsity, what="block_prune_mask"):
    """The keep-mask equals the float64 oracle's except where a score is a near-tie with the
    block's threshold (the batched form: each layer's block with its own threshold)."""
    if W1.dim() == 3:
        assert keep.shape == W1.shape, f"{what}: {tuple(keep.shape)}, want {tuple(W1.shape)}"
        for e in range(W1.shape[0]):
            check_block_prune_mask(keep[e], W1[e], hinv_diag[e], sparsity, f"{what} layer {e}")
        return
    assert keep.dtype == torch.bool and keep.shape == W1.shape, f"{what}: {keep.dtype}"
    want, s, thr = oracle_block_prune_mask(W1, hinv_diag, sparsity)
    keep = keep.cpu()
    flips = keep != want
    if flips.any():
        tol = NEAR_TIE_RTOL[state_dtype(W1, hinv_diag)]
        far = flips & ((s - thr).abs() > tol * torch.maximum(s, thr.expand_as(s)))
        assert not far.any(), (
            f"{what}: entries {far.nonzero()[:5].tolist()} differ from the oracle with "
            f"scores {s[far][:5].tolist()} not near the threshold {thr.item():.9g}; "
            f"{NEAR_TIE_NOTE}"
        )


# --------------------------------------------------------------------- column_losses


def oracle_column_losses(S, bounds, sparsity, prune_n=0, prune_m=0):
    """`(column, block)` in float64: per block `S <= sorted(S_block)[int(numel*s)]`, or the
    prune_n lowest of each group of prune_m (a lower column wins an exact tie)."""
    S = S.detach().double().cpu()
    rows, cols = S.shape
    if prune_n:
        low = _lowest_n_stable(S.reshape(-1, prune_m), prune_n).reshape(rows, cols)
        col = (S * low).sum(0)
        return col, col.reshape(-1, prune_m).sum(1)
    col = torch.zeros(cols, dtype=torch.float64)
    block = torch.zeros(len(bounds), dtype=torch.float64)
    for b, (i1, i2) in enumerate(bounds):
        Sb = S[:, i1:i2]
        thr = torch.sort(Sb.flatten()).values[int(Sb.numel() * sparsity)]
        L = Sb * (Sb <= thr)
        col[i1:i2] = L.sum(0)
        block[b] = L.sum()
    return col, block


def check_column_losses(out, S, bounds, sparsity, prune_n=0, prune_m=0, what="column_losses"):
    """Column and block losses within OP_RTOL of the float64 oracle (the selection is on the
    given scores, exact in any precision: no near-ties to allow)."""
    col, block = out
    want_col, want_block = oracle_column_losses(S, bounds, sparsity, prune_n, prune_m)
    rtol = OP_RTOL[state_dtype(S)]
    assert_close(block, want_block, rtol=rtol, what=f"{what} block")
    assert_close_to_scale(col, want_col, rtol, what=f"{what} column")


# ----------------------------------------------------------------------- swap_search


def oracle_swap_search(w, keep, c, H, prune_m=0, u=None, p=None):
    """The exhaustive search in float64, over every pair (u kept, p pruned; N:M: inside one
    group). Returns per row `(min Δ, Δ of the given pair (u, p), magnitude of the Δ terms)`,
    the magnitude being the scale of a float computation's rounding; +inf where a row has no
    candidate pair (or (u, p) is not one). Chunked over rows: no big [rows, cols, cols]."""
    w, c, H, keep = w.double().cpu(), c.double().cpu(), H.double().cpu(), keep.cpu()
    rows, cols = w.shape
    hd = H.diagonal()
    group = torch.arange(cols) // prune_m if prune_m else None
    dmin = torch.empty(rows, dtype=torch.float64)
    dup = torch.full((rows,), float("inf"), dtype=torch.float64)
    scale = torch.empty(rows, dtype=torch.float64)
    step = max(1, (1 << 21) // (cols * cols))
    for r0 in range(0, rows, step):
        r = slice(r0, min(rows, r0 + step))
        wr, cr, kr = w[r], c[r], keep[r]
        a = wr * wr * hd + 2 * wr * cr
        b = wr * wr * hd - 2 * wr * cr
        cross = 2 * wr[:, :, None] * H[None] * wr[:, None, :]
        D = a[:, :, None] + b[:, None, :] - cross
        legal = kr[:, :, None] & ~kr[:, None, :]
        if group is not None:
            legal &= (group[:, None] == group[None, :])[None]
        D = D.masked_fill(~legal, float("inf"))
        mag = (a.abs()[:, :, None] + b.abs()[:, None, :] + cross.abs()).masked_fill(~legal, 0)
        dmin[r] = D.flatten(1).min(1).values
        scale[r] = mag.flatten(1).amax(1)
        if u is not None:
            i = torch.arange(r.stop - r0)
            ok = (u[r] >= 0) & (u[r] < cols) & (p[r] >= 0) & (p[r] < cols)
            dup[r][ok] = D[i[ok], u[r][ok], p[r][ok]]
    return dmin, dup, scale


def check_swap_search(out, w, keep, c, H, prune_n=0, prune_m=0, rows=None, what="swap_search"):
    """Each searched row's (u, p, Δ) is a legal pair whose Δ is the exhaustive minimum (ties
    either way: Δ values and legality are checked, never the indices); +inf exactly where a
    row has no candidate pair. Returns each row's Δ scale."""
    u, p, delta = out
    if rows is not None:
        rows = rows.cpu()
        w, keep, c = w.cpu()[rows], keep.cpu()[rows], c.cpu()[rows]
    assert u.dtype == p.dtype == torch.int64, f"{what}: u/p dtypes {u.dtype}/{p.dtype}"
    assert delta.dtype == w.dtype, f"{what}: delta is {delta.dtype}, w {w.dtype}"
    assert u.shape == p.shape == delta.shape == (w.shape[0],)
    u, p, delta, keep = u.cpu(), p.cpu(), delta.double().cpu(), keep.cpu()
    dmin, dup, scale = oracle_swap_search(w, keep, c, H, prune_m if prune_n else 0, u, p)
    none = torch.isinf(dmin)
    assert torch.equal(torch.isinf(delta), none), (
        f"{what}: +inf delta in rows {torch.isinf(delta).nonzero().flatten().tolist()}, "
        f"rows without a candidate pair {none.nonzero().flatten().tolist()}"
    )
    ok = ~none
    r = torch.arange(len(u))[ok]
    tol = OP_RTOL[state_dtype(w)] * scale[ok] + 1e-300
    assert keep[r, u[ok]].all() and not keep[r, p[ok]].any(), f"{what}: illegal pair"
    if prune_n:
        assert torch.equal(u[ok] // prune_m, p[ok] // prune_m), f"{what}: pair crosses groups"
    err = (delta[ok] - dmin[ok]).abs()
    assert (err <= tol).all(), f"{what}: Δ off the minimum by {(err / tol).max():.3g} x tol"
    achieved = (dup[ok] - dmin[ok]).abs()
    assert (achieved <= tol).all(), f"{what}: returned pair does not achieve the minimum"
    return scale


# ------------------------------------------------------------------------ swap_apply


def check_swap_apply(keep_after, c_after, w, keep, c, H, rows, u, p, what="swap_apply"):
    """`keep_after`, `c_after` (updated in place from `keep`, `c`) equal the swap applied to
    float64 copies: keep exactly, c within OP_RTOL of its scale."""
    w64, H64 = w.double().cpu(), H.double().cpu()
    k, c64 = keep.cpu().clone(), c.double().cpu().clone()
    rows, u, p = rows.cpu(), u.cpu(), p.cpu()
    if rows.numel():
        k[rows, u] = False
        k[rows, p] = True
        c64[rows] += w64[rows, u, None] * H64[u] - w64[rows, p, None] * H64[p]
    assert torch.equal(keep_after.cpu(), k), f"{what}: keep " + str(
        (keep_after.cpu() != k).nonzero()[:5].tolist()
    )
    assert c_after.dtype == c.dtype
    assert_close_to_scale(c_after, c64, OP_RTOL[state_dtype(w, c)], what=f"{what} c")


def check_swap_result(r, W, H, n, m, converged):
    """A SparseSwaps result on its own mask: loss_after the float64 loss of that mask, never
    above loss_before, and (`converged`) a local optimum: the exhaustive search finds no swap
    improving by more than rounding."""
    Wd, Hd, keep = W.double(), H.double(), r.mask.cpu()
    res = Wd * ~keep
    assert r.info["loss_after"] <= r.info["loss_before"]
    assert r.info["loss_after"] == pytest.approx(((res @ Hd) * res).sum().item(), rel=1e-5)
    if converged:
        assert r.info["converged"]
        dmin, _, scale = oracle_swap_search(Wd, keep, res @ Hd, Hd, m if n else 0)
        assert (dmin >= -2 * OP_RTOL[torch.float32] * scale).all(), "an improving swap is left"


CHECKS = {
    "obs_sweep": check_obs_sweep,
    "block_prune_mask": check_block_prune_mask,
    "column_losses": check_column_losses,
    "swap_search": check_swap_search,
}
"""Checks of one op call from its output and arguments (swap_apply works in place: its check
needs the state before the call and is run by the tests directly)."""


# ------------------------------------------------------------- whole OBS solves (layers)


class FollowedSolve(NamedTuple):
    weight: torch.Tensor  # float64, the research loop's weights along the given mask
    loss_rows: torch.Tensor  # float64, sum err^2 / 2 per row
    worst: float  # the largest gap of a decision, as a multiple of its near-tie tolerance


def _check_block_threshold(keep1, s, smag, sparsity, tol, what):
    """A block's unstructured choice is the research rule (prune `s <= sorted(s)[k]`,
    k = int(numel * sparsity)) up to near-ties; returns the worst gap / tolerance."""
    pruned = ~keep1
    k = int(s.numel() * sparsity)
    got = int(pruned.sum())
    assert got >= k + 1, f"{what}: prunes {got} entries, the `<=` rule at least {k + 1}"
    worst = 0.0
    if pruned.any() and keep1.any():
        # every pruned p and kept q: s_p <= s_q unless the two are a near-tie
        hi = (s - tol * smag)[pruned].max()
        lo = (s + tol * smag)[keep1].min()
        worst = ((hi - lo) / (tol * smag.max() + 1e-300)).item()
        assert hi <= lo, (
            f"{what}: a pruned entry's score exceeds a kept one's beyond the near-tie "
            f"tolerance; {NEAR_TIE_NOTE}"
        )
    if got > k + 1:  # more only where float32 scores tie at the threshold
        flat, order = torch.sort(s.flatten(), stable=True)
        top = s[pruned].argmax()
        gap = s[pruned][top] - flat[k]
        slack = tol * (smag[pruned][top] + smag.flatten()[order[k]]) + 1e-300
        assert gap <= slack, f"{what}: {got - k - 1} extra entries pruned without a tie"
    return worst


def _check_groups(keep_g, s, smag, n, tol, what):
    """Each N:M group prunes exactly n, its n lowest scores up to near-ties."""
    pruned = ~keep_g
    counts = pruned.sum(1)
    assert (counts == n).all(), f"{what}: groups prune {counts.unique().tolist()}, not {n}"
    a = pruned[:, :, None] & keep_g[:, None, :]
    gap = s[:, :, None] - s[:, None, :]
    slack = tol * (smag[:, :, None] + smag[:, None, :]) + 1e-300
    ratio = (gap / slack).masked_fill(~a, 0.0)
    assert not (a & (gap > slack)).any(), (
        f"{what}: a group prunes a score above one it keeps beyond the near-tie tolerance "
        f"(worst {ratio.max().item():.3g}x); {NEAR_TIE_NOTE}"
    )
    return ratio.max().item() if ratio.numel() else 0.0


def follow_obs_solve(W, hinv, keep, widths, sparsity=0.5, n=0, m=0, what="mask", fixed=False):
    """The research loop (`fastprune.original.original_sparsegpt`) in float64 on `hinv` (the
    solve's own inverse, so only the sweep's rounding separates the two), taking every mask
    decision from `keep` (True = kept) instead of making it, and checking each decision
    against the research rule on the scores it was made from: the block threshold
    (unstructured) or the group's n lowest (N:M), up to near-ties. Near-tie tolerance:
    NEAR_TIE_RTOL of the scores' magnitude, the magnitude of a weight being |w| plus the
    magnitudes of every update it received (the scale of a float32 solve's rounding).
    `W` with its dead columns zeroed, as the solvers sweep it; `fixed`: `keep` was given to
    the solve (no decision to check). Returns the weights and per-row
    losses along `keep`, and the worst decision gap as a multiple of its tolerance."""
    W = W.detach().double().cpu().clone()
    H = hinv.detach().double().cpu()
    keep = keep.cpu()
    mag = W.abs()
    tol = NEAR_TIE_RTOL[torch.float32]
    rows, cols = W.shape
    assert sum(widths) == cols
    loss = torch.zeros(rows, dtype=torch.float64)
    worst = 0.0
    i2 = 0
    for b, count in enumerate(widths):
        i1, i2 = i2, i2 + count
        W1, M1 = W[:, i1:i2].clone(), mag[:, i1:i2].clone()
        Hinv1 = H[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        k1 = keep[:, i1:i2]
        Q1, Err1, Emag1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        if not n and not fixed:
            s, smag = W1**2 / d**2, M1**2 / d**2
            where = f"{what} block {b}"
            worst = max(worst, _check_block_threshold(k1, s, smag, sparsity, tol, where))
        for i in range(count):
            if n and not fixed and i % m == 0:
                g = slice(i, i + m)
                s, smag = W1[:, g] ** 2 / d[g] ** 2, M1[:, g] ** 2 / d[g] ** 2
                where = f"{what} columns {i1 + i}..{i1 + i + m - 1}"
                worst = max(worst, _check_groups(k1[:, g], s, smag, n, tol, where))
            w = W1[:, i]
            q = w * k1[:, i]
            err = (w - q) / d[i]
            emag = M1[:, i] * ~k1[:, i] / d[i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:]
            M1[:, i + 1 :] += emag[:, None] * Hinv1[i, i + 1 :].abs()
            Q1[:, i], Err1[:, i], Emag1[:, i] = q, err, emag
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ H[i1:i2, i2:]
        mag[:, i2:] += Emag1 @ H[i1:i2, i2:].abs()
        loss += (Err1 * Err1).sum(1) / 2
    return FollowedSolve(W, loss, worst)


def check_obs_solve(
    r, W, H, sparsity=0.5, n=0, m=0, blocksize=128, percdamp=0.01, method="direct",
    perm=None, widths=None, rtol=1e-5, what="solve", hinv=None, fixed=False,
):  # fmt: skip
    """A SparseGPT-type result `r` (mask, weight) against the research loop run along its
    own mask (`follow_obs_solve`), on the solve's own inverse of H (`perm`: the columns in
    sweep order, as ROSE reorders them; `widths`: the sweep's block widths): every mask
    decision is the research rule's up to near-ties, and the weights are the loop's along
    that mask within `rtol` (relative error over the whole layer: no row is skipped).
    Holds for every input: nothing here depends on how many near-ties a draw has. `hinv`:
    the solve's inverse when it is not `inverse_hessian(H, percdamp, method=method)` (a
    batched solve's own); `fixed`: the mask was given to the solve."""
    from fastprune.solvers.obs import block_bounds, nm_blocksize

    dtype = state_dtype(W, H)
    cols = W.shape[1]
    if perm is None:
        perm = torch.arange(cols)
    Hp = H[perm][:, perm]
    inv = hinv if hinv is not None else inverse_hessian(Hp, percdamp, dtype=dtype, method=method)
    Wp = W.detach().cpu().to(dtype)[:, perm].clone()
    Wp[:, inv.dead.cpu()] = 0
    if widths is None:
        widths = [i2 - i1 for i1, i2 in block_bounds(cols, nm_blocksize(blocksize, m))]
    keep = r.mask.cpu()[:, perm]
    f = follow_obs_solve(Wp, inv.hinv, keep, widths, sparsity, n, m, what, fixed)
    inv_perm = torch.argsort(perm)
    want = f.weight[:, inv_perm]
    got = r.weight.detach().cpu().double()
    err = ((got - want).norm() / want.norm().clamp_min(1e-300)).item()
    assert err <= rtol, f"{what}: weights {err:.3g} (relative) from the loop along its mask"
    return f


def check_rose_solve(
    r, W, H, sparsity=0.5, n=0, m=0, blocksize=128, range_rule="per_column", method="direct",
    rtol=1e-5, what="rose", losses=None,
):  # fmt: skip
    """`check_obs_solve` of a ROSE result: along the column order and sweep blocks ROSE
    derives from W and H when it reordered (from `losses`, the solve's own column and block
    losses, or else torch's), else SparseGPT's."""
    from fastprune.ops import torch_column_losses
    from fastprune.solvers.core import wanda_score
    from fastprune.solvers.obs import block_bounds
    from fastprune.solvers.rose import comparable_block_losses, rose_permutation

    kw = dict(method=method, rtol=rtol, what=what)
    if not r.info["reordered"]:
        return check_obs_solve(r, W, H, sparsity, n, m, blocksize, **kw)
    bounds = block_bounds(W.shape[1], m if n else blocksize)
    if losses is None:
        S = wanda_score(W.cpu(), H.cpu(), dtype=state_dtype(W, H))
        losses = torch_column_losses(S, bounds, sparsity, n, m)
    col, blk = (t.cpu() for t in losses)
    perm, sizes = rose_permutation(col, comparable_block_losses(blk, bounds, range_rule), bounds)
    return check_obs_solve(
        r, W, H, sparsity, n, m, blocksize, perm=perm, widths=None if n else sizes, **kw
    )
