"""Mixture-of-experts pruning, checked against an independent restatement.

Tiny MoE models of every family transformers 5 ships with fused 3-D expert parameters
(`pipeline_helpers.MOE_FAMILIES`), and a hand-written MoE whose experts are an
`nn.ModuleList` of MLPs. The restatement never uses fastprune's hooks: it runs a copy of the
dense model one calibration sample at a time (the pipeline's default batch_size=1), reads the
arguments of each experts call (`experts(hidden [T, H], top_k_index [T, k], weights)`), picks
each expert's routed tokens itself, computes the experts' intermediate activations from
explicit formulas, builds `H_e = 2/n_e X_e^T X_e` in float64 and calls the public layer
solver with the options the registry gives it.
"""

from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch
from pipeline_helpers import MOE_FAMILIES, calib_ids, tiny_model, tiny_moe_model
from torch import nn
from torch.nn import functional as F

import fastprune
from fastprune import METHODS
from fastprune.hessian import HessianAccumulator, row_losses

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402

NSAMPLES, SEQLEN = 4, 32
TOKENS = NSAMPLES * SEQLEN
MAX_SWAPS = 2
# the recipe's least-squares refit run to convergence (its tolerance stops it first), so
# that pipeline and restatement are compared at the optimum, not at two truncated iterates
REFIT_ITERS = 500
PATTERNS = [(0, 0), (2, 4)]
PATTERN_IDS = ["unstructured", "2:4"]
# what each method's solver is called with by the pipeline (checked against the registry in
# test_restated_options so a changed default shows up there, not as a mystery mismatch)
SOLVER_OPTIONS = {
    "magnitude": {},
    "wanda": {},
    "sparsegpt": {"blocksize": 128, "percdamp": 0.01, "backend": "auto"},
    "rose": {"blocksize": 128, "percdamp": 0.01, "range_threshold": 0.5, "backend": "auto"},
    "sparseswaps": {
        "max_swaps": MAX_SWAPS,
        "reconstruct": False,
        "percdamp": 0.01,
        "backend": "auto",
    },
    "fastprune": {
        "select": "auto",
        "refine": None,
        "refine_on": "reconstructed",
        "reconstruct": "lstsq",
        "max_swaps": MAX_SWAPS,
        "refit_iters": REFIT_ITERS,
        "rounds": 1,
        "damping_levels": None,
        "blocksize": 128,
        "percdamp": 0.01,
        "range_threshold": 0.5,
        "backend": "auto",
    },
}
PIPELINE_OPTIONS = {
    "sparseswaps": {"max_swaps": MAX_SWAPS},
    "fastprune": {"max_swaps": MAX_SWAPS, "refit_iters": REFIT_ITERS},
}
RESTATED_METHODS = tuple(SOLVER_OPTIONS)
MASK_AGREE = 0.999
WEIGHT_RTOL = 1e-4
LOSS_RTOL = 1e-3
# a row whose mask differs by a rounding-level near-tie: an OBS flip changes the updates of
# the rest of its row, so several of its entries may differ and its greedy sweep may end
# better or worse; the pipeline's row may not be worse than the restated one by more than
# this (its loss `d H d^T`), and at most this fraction of the rows (at least one) may differ
TIE_ROW_LOSS_RTOL = 0.05
# the least-squares refit (reconstruct="lstsq") stops after a fixed number of conjugate-
# gradient iterations: its weights move by up to cond(H) times the rounding difference between
# the pipeline's H and the restated one, while each row's loss `d H d^T`, flat at the optimum,
# stays put; those rows are compared by loss
REFIT_ROW_LOSS_RTOL = 1e-3
TIE_ROWS = 0.02


# --------------------------------------------------------------------------- helpers


def _moe_model(family: str):
    """`tiny_moe_model`, with gpt-oss's expert and router biases made nonzero (transformers
    initialises them to zero, which would hide a gating that drops them); the gate/up bias
    is large enough that some activations reach gpt-oss's clamps (+-7)."""
    model = tiny_moe_model(family)
    if family == "gpt_oss":
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for layer in model.model.layers:
                ex, router = layer.mlp.experts, layer.mlp.router
                gu, down = ex.gate_up_proj_bias, ex.down_proj_bias
                gu.copy_(3.0 * torch.randn(gu.shape, generator=g))
                down.copy_(0.2 * torch.randn(down.shape, generator=g))
                router.bias.copy_(0.2 * torch.randn(router.bias.shape, generator=g))
    return model


def _first_moe_block(family: str) -> int:
    return 1 if family == "deepseek_v3" else 0  # DeepSeek-V3: block 0 is dense


def _transposed(family: str) -> bool:
    return family == "gpt_oss"  # [E, in, out] instead of [E, out, in]


def _expected_dense(family: str, nblocks: int) -> set[tuple[str, str]]:
    """(name, reason) of every matrix the pipeline must leave dense, by family."""
    out = set()
    for i in range(nblocks):
        if family == "deepseek_v3" and i == 0:
            continue
        if family == "gpt_oss":
            out.add((f"{i}.mlp.router.weight", "router"))
            out.add((f"{i}.mlp.experts.gate_up_proj_bias", "expert biases"))
            out.add((f"{i}.mlp.experts.down_proj_bias", "expert biases"))
            continue
        out.add((f"{i}.mlp.gate.weight", "router"))
        if family == "qwen2_moe":
            out.add((f"{i}.mlp.shared_expert_gate.weight", "shared-expert gate (a router)"))
    return out


def _is_fused(pname: str, p: torch.Tensor) -> bool:
    return p.dim() == 3 and pname.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj")


def _oriented(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A weight as [out, in]."""
    return t.t() if transposed else t


def _layer_matrix(blocks: nn.ModuleList, name: str, transposed: bool) -> torch.Tensor:
    """The [out, in] matrix a report layer name designates: `3.mlp.experts.down_proj[1]`
    (a fused slice) or `3.self_attn.q_proj` (a linear)."""
    i, rel = name.split(".", 1)
    block = blocks[int(i)]
    if rel.endswith("]"):
        pname, e = rel[:-1].split("[")
        return _oriented(block.get_parameter(pname)[int(e)], transposed).detach()
    return block.get_submodule(rel).weight.detach()


def _gram(x: torch.Tensor) -> torch.Tensor:
    """`2/n X^T X` (float64, then float32) for the n rows of x, one sample each; I if none."""
    if x.shape[0] == 0:
        return torch.eye(x.shape[1])
    x = x.double()
    return (2.0 / x.shape[0] * (x.t() @ x)).float()


def _solve(method: str, W: torch.Tensor, H: torch.Tensor, sparsity: float, n: int, m: int, G=None):
    """The public layer solver the pipeline's registry names, with its options (GBLM: its
    default alpha, with the gradient norm `G`)."""
    if method == "gblm":
        return fastprune.gblm_layer(W, H, sparsity, n, m, G=G, alpha=1.0)
    o = SOLVER_OPTIONS[method]
    if method == "magnitude":
        return fastprune.magnitude_layer(W, None, sparsity, n, m)
    if method == "wanda":
        return fastprune.wanda_layer(W, H, sparsity, n, m)
    if method == "sparsegpt":
        return fastprune.sparsegpt_layer(W, H, sparsity, n, m, **o)
    if method == "rose":
        return fastprune.rose_layer(W, H, sparsity, n, m, **o)
    if method == "sparseswaps":
        return fastprune.sparseswaps_layer(W, H, sparsity=sparsity, prune_n=n, prune_m=m, **o)
    if method == "fastprune":
        return fastprune.fastprune_layer(W, H, sparsity, n, m, **o)
    raise ValueError(method)


def _assert_same_prune(
    name: str,
    got: torch.Tensor,
    want: torch.Tensor,
    W: torch.Tensor | None = None,
    H: torch.Tensor | None = None,
    refit: bool = False,
) -> int:
    """The pipeline's pruned matrix `got` against the restated `want` ([out, in] both):
    zero patterns agree on >= MASK_AGREE of the entries, or (given the dense `W` and the
    restated `H`) they differ in at most TIE_ROWS of the rows, none of them worse than the
    restated row by more than TIE_ROW_LOSS_RTOL of its loss `d H d^T`; in every row where they agree
    entirely the weights agree within WEIGHT_RTOL of the row's largest |weight| (rows where
    one mask entry flipped legitimately diverge under OBS updates), or for a least-squares
    refit (`refit`) their losses within REFIT_ROW_LOSS_RTOL. Returns the number of mask
    entries that differ."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    gm, wm = got != 0, want != 0
    diff = gm != wm
    nd = int(diff.sum())
    agree = 1.0 - nd / diff.numel()
    first = [tuple(ix) for ix in diff.nonzero()[:5].tolist()]
    message = (
        f"{name}: zero patterns differ at {nd} of {diff.numel()} entries (agree {agree:.5f} "
        f"< {MASK_AGREE}); first at {first}; pruned {int((~gm).sum())} vs restated "
        f"{int((~wm).sum())}"
    )
    if agree < MASK_AGREE:
        assert W is not None and H is not None, message
        _assert_near_ties(message, diff.any(1), W, got, want, H)
    rows = ~diff.any(1)
    if refit:
        assert W is not None and H is not None, f"{name}: a refit is compared by its row losses"
        lg, lw = (row_losses(W.float(), x.float(), H.float())[rows] for x in (got, want))
        rel = (lg - lw).abs() / lw.abs().clamp_min(1e-30)
        assert (rel <= REFIT_ROW_LOSS_RTOL).all(), (
            f"{name}: {int((rel > REFIT_ROW_LOSS_RTOL).sum())} refitted rows' losses differ by "
            f"more than {REFIT_ROW_LOSS_RTOL} (max {rel.max().item():.3g})"
        )
        return nd
    g, w = got[rows].double(), want[rows].double()
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-30)
    err = (g - w).abs() / scale
    bad = err > WEIGHT_RTOL
    if bad.any():
        r, c = bad.nonzero()[0].tolist()
        row = rows.nonzero()[r].item()
        raise AssertionError(
            f"{name}: {int(bad.sum())} weights differ by more than {WEIGHT_RTOL} of their row's "
            f"largest |w| (max {err.max().item():.3g}); first at ({row}, {c}): pipeline "
            f"{g[r, c].item():.8g}, restated {w[r, c].item():.8g}"
        )
    return nd


def _assert_near_ties(
    message: str,
    rows: torch.Tensor,
    W: torch.Tensor,
    got: torch.Tensor,
    want: torch.Tensor,
    H: torch.Tensor,
) -> None:
    """The rows `rows` whose masks differ are few (TIE_ROWS) and none worse than the
    restated row under `H` (TIE_ROW_LOSS_RTOL): a near-tie the rounding decided (a wrong H
    or update would make the pipeline's rows worse), not a bug."""
    count = int(rows.sum())
    assert count <= max(1, TIE_ROWS * rows.numel()), f"{message}; {count} rows differ"
    lg, lw = row_losses(W, got, H)[rows], row_losses(W, want, H)[rows]
    rel = (lg - lw) / lw.abs().clamp_min(1e-30)
    assert (rel <= TIE_ROW_LOSS_RTOL).all(), (
        f"{message}; row losses {lg.tolist()} vs restated {lw.tolist()}"
    )


def _call_args(module: nn.Module, args: tuple, kwargs: dict):
    """(hidden, top_k_index) of a call experts(hidden, top_k_index, weights)."""
    if len(args) >= 2:
        return args[0], args[1]
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    vals = list(bound.arguments.values())
    return vals[0], vals[1]


@torch.no_grad()
def _experts_calls(model, experts: nn.Module, ids: torch.Tensor):
    """Run `model` on each calibration sample alone; the hidden states [T, H] and expert
    choices [T, k] of every call of `experts`, concatenated over samples."""
    xs, idxs = [], []

    def hook(mod, args, kwargs):
        hidden, top_k = _call_args(mod, args, kwargs)
        x = hidden.reshape(-1, hidden.shape[-1])
        xs.append(x.detach().clone())
        idxs.append(top_k.reshape(x.shape[0], -1).detach().clone())

    h = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in range(ids.shape[0]):
            model(ids[s : s + 1], use_cache=False)
    finally:
        h.remove()
    assert len(xs) == ids.shape[0], "the experts module was not called once per sample"
    return torch.cat(xs), torch.cat(idxs)


def _fused_intermediate(family: str, experts: nn.Module, e: int, x: torch.Tensor, act):
    """Expert e's input to down_proj for hidden states x [n, H], from the dense weights."""
    if family == "gpt_oss":  # transposed weights, biases, interleaved clamped GLU
        h = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
        gate, up = h[..., ::2], h[..., 1::2]
        gate = gate.clamp(max=7.0)
        up = up.clamp(min=-7.0, max=7.0)
        return (up + 1) * (gate * torch.sigmoid(gate * 1.702))
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return act(gate) * up


def _by_name(report) -> dict:
    names = [lr.name for lr in report.layers]
    assert len(names) == len(set(names)), "a layer is reported twice"
    return {lr.name: lr for lr in report.layers}


def _check_loss(name: str, lr, r, mismatches: int) -> None:
    """The report's loss tr(D H D^T) was computed with the pipeline's H: equal to the
    restated solve's own loss only if H is normalised as restated (2/n_e)."""
    if r.loss is None or lr.loss is None or mismatches:
        return
    assert lr.loss == pytest.approx(r.loss, rel=LOSS_RTOL, abs=1e-9), (
        f"{name}: report loss {lr.loss} != restated {r.loss}"
    )


@torch.no_grad()
def _restate_fused_block(
    family, dense, model, report, b, ids, method, sparsity, n, m, every=False, grads=None
) -> int:
    """Restate every expert of block b's fused experts module and compare with the pipeline.
    `dense`: a copy of the dense model whose blocks < b already hold the pipeline's pruned
    weights. Returns the number of mask entries that differ."""
    tr = _transposed(family)
    by_name = _by_name(report)
    act = ACT2FN[dense.config.hidden_act]
    exd = dense.model.layers[b].mlp.experts
    exp = model.model.layers[b].mlp.experts
    x, idx = _experts_calls(dense, exd, ids)
    assert x.shape[0] == TOKENS
    E = exd.down_proj.shape[0]
    total = 0
    counts = []
    for e in range(E):
        xe = x if every else x[(idx == e).any(-1)]
        counts.append(xe.shape[0])
        mid = (
            _fused_intermediate(family, exd, e, xe, act)
            if xe.shape[0]
            else x.new_zeros(0, exd.down_proj.shape[1 if tr else 2])
        )
        for proj, H in (("gate_up_proj", _gram(xe)), ("down_proj", _gram(mid))):
            name = f"{b}.mlp.experts.{proj}[{e}]"
            W0 = _oriented(getattr(exd, proj)[e], tr).contiguous()
            Wp = _oriented(getattr(exp, proj)[e], tr)
            G = None if grads is None else _oriented(grads[b, proj][e], tr).contiguous()
            r = _solve(method, W0, H, sparsity, n, m, G)
            refit = r.info.get("result") == "refit"
            nd = _assert_same_prune(name, Wp, r.weight, W0, H, refit=refit)
            total += nd
            lr = by_name[name]
            if method != "magnitude":
                assert lr.info.get("tokens") == xe.shape[0], (
                    f"{name}: report says {lr.info.get('tokens')} tokens, restated {xe.shape[0]}"
                )
            _check_loss(name, lr, r, nd)
    if not every:
        k = idx.shape[1]
        assert sum(counts) == TOKENS * k  # top-k picks k distinct experts per token
    return total


def _load_pruned_blocks(dense, model, upto: int) -> None:
    """The pipeline calibrates block b on the outputs of the blocks before it *as pruned*:
    give the dense copy those blocks' pruned weights."""
    for j in range(upto):
        dense.model.layers[j].load_state_dict(model.model.layers[j].state_dict())


def _prune(model, method, sparsity=0.5, n=0, m=0, **kw):
    opts = dict(PIPELINE_OPTIONS.get(method, {}))
    opts.update(kw)
    return fastprune.prune_model(
        model,
        calib_ids(NSAMPLES, SEQLEN),
        method=method,
        sparsity=sparsity,
        prune_n=n,
        prune_m=m,
        progress=False,
        **opts,
    )


def _check_nm(name: str, W: torch.Tensor, n: int, m: int) -> None:
    zeros = (W == 0).reshape(W.shape[0], -1, m).sum(-1)
    bad = (zeros < n).nonzero()
    assert bad.numel() == 0, (
        f"{name}: {bad.shape[0]} groups of {m} inputs with fewer than {n} zeros, first "
        f"(row, group) {bad[0].tolist()}"
    )


# ------------------------------------------------------------------ 1. coverage / target


@pytest.mark.parametrize("n,m", PATTERNS, ids=PATTERN_IDS)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_matrix_pruned_or_dense(family, method, n, m):
    model = _moe_model(family)
    dense = copy.deepcopy(model)
    report = _prune(model, method, 0.5, n, m)
    blocks, dblocks = model.model.layers, dense.model.layers
    tr = _transposed(family)
    by_name = _by_name(report)
    dense_rep = {d["name"]: d for d in report.dense}
    assert len(dense_rep) == len(report.dense), "a dense matrix is reported twice"
    assert {(d["name"], d["reason"]) for d in report.dense} == _expected_dense(family, len(blocks))

    covered = set()
    zeros = total = 0
    moe_blocks = 0
    for i, (blk, dblk) in enumerate(zip(blocks, dblocks)):
        dparams = dict(dblk.named_parameters())
        fused_here = 0
        for pname, p in blk.named_parameters():
            full = f"{i}.{pname}"
            if p.dim() < 2:  # norms, biases, gpt-oss's router bias: never touched
                assert torch.equal(p, dparams[pname]), f"{full} changed"
                continue
            zeros += int((p == 0).sum())
            total += p.numel()
            if full in dense_rep:
                assert full not in by_name
                assert dense_rep[full]["shape"] == list(p.shape)
                assert torch.equal(p, dparams[pname]), f"{full} is left dense but changed"
                covered.add(full)
                continue
            if _is_fused(pname, p):
                fused_here += 1
                names = [f"{full}[{e}]" for e in range(p.shape[0])]
                missing = [x for x in names if x not in by_name]
                assert not missing, f"{full}: experts {missing} not in the report"
                covered.update(names)
                tokens = [by_name[x].info.get("tokens") for x in names]
                assert all(isinstance(t, int) and t >= 0 for t in tokens), (full, tokens)
                if pname.endswith("gate_up_proj"):  # every token goes to top_k experts
                    k = model.config.num_experts_per_tok
                    assert sum(tokens) == TOKENS * k, (full, tokens)
                continue
            assert pname.endswith(".weight"), f"{full}: neither a layer nor dense"
            lname = f"{i}.{pname[: -len('.weight')]}"
            assert lname in by_name, f"{full}: neither in report.layers nor in report.dense"
            covered.add(lname)
        for bname, buf in blk.named_buffers():
            assert torch.equal(buf, dict(dblk.named_buffers())[bname]), f"{i}.{bname} changed"
        moe_blocks += fused_here > 0
    assert moe_blocks == len(blocks) - (family == "deepseek_v3")
    assert set(by_name) | set(dense_rep) == covered, "the report names something else"

    # every pruned layer (each expert slice, every linear) at the target
    for name, lr in by_name.items():
        expert = name.endswith("]")
        W = _layer_matrix(blocks, name, tr and expert)
        W0 = _layer_matrix(dblocks, name, tr and expert)
        nz = int((W == 0).sum())
        assert lr.sparsity == pytest.approx(nz / W.numel(), abs=1e-12), name
        if n:
            _check_nm(name, W, n, m)
            assert nz >= W.numel() // 2
        else:  # the count the solver prunes (independent of H without ties)
            want = _solve(method, W0.contiguous(), torch.eye(W0.shape[1]), 0.5, 0, 0)
            assert nz == int((~want.mask).sum()), f"{name}: {nz} zeros, solver prunes " + str(
                int((~want.mask).sum())
            )
    assert report.totals["block_params"] == total
    assert report.totals["block_zeros"] == zeros
    assert report.block_sparsity == pytest.approx(zeros / total, abs=1e-12)
    assert report.totals["moe_calibration"] == "routed"

    with torch.no_grad():
        logits = model(calib_ids(2, 16, seed=7), use_cache=False).logits
    assert torch.isfinite(logits).all()


# -------------------------------------------------------------- 2. independent restatement


def test_restated_options():
    """The restatement calls each solver with the options the registry passes it."""
    for method, want in SOLVER_OPTIONS.items():
        meth = METHODS[method]
        opts = meth.check_options(PIPELINE_OPTIONS.get(method, {}))
        got = {k: opts[k] for k in meth.solver_options}
        assert got == want, method
        assert meth.solver is getattr(fastprune, f"{method}_layer")
    gblm = METHODS["gblm"].check_options({})  # _gradient_norms: l2, scale 100; alpha 1
    assert (gblm["alpha"], gblm["norm"], gblm["scale"]) == (1.0, "l2", 100.0)


@pytest.mark.parametrize("n,m", PATTERNS, ids=PATTERN_IDS)
@pytest.mark.parametrize("method", RESTATED_METHODS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_experts_restated(family, method, n, m):
    """Every expert of every MoE block against the restatement. The first MoE block's
    experts see the dense model's hidden states (all Hessians of a block are taken in one
    forward of the dense block, before any of its layers is pruned); a later block's
    experts see the outputs of the blocks before it as the pipeline pruned them, so the
    restatement's copy gets those blocks' pruned weights (for DeepSeek-V3, whose block 0 is
    a dense MLP block, the first MoE block 1 is thereby restated exactly too)."""
    model = _moe_model(family)
    dense = copy.deepcopy(model)
    report = _prune(model, method, 0.5, n, m)
    ids = calib_ids(NSAMPLES, SEQLEN)
    first = _first_moe_block(family)
    for b in range(first, len(model.model.layers)):
        _load_pruned_blocks(dense, model, b)
        _restate_fused_block(family, dense, model, report, b, ids, method, 0.5, n, m)


def _gradient_norms(model, ids) -> dict:
    """GBLM's l2 gradient norm of every fused expert parameter, restated with autograd on
    the dense model: sqrt(sum over samples of (100 * grad)^2), one backward per sample."""
    model = copy.deepcopy(model)
    sums = {}
    for i in range(ids.shape[0]):
        model.zero_grad()
        x = ids[i : i + 1]
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        for b, block in enumerate(model.model.layers):
            experts = getattr(block.mlp, "experts", None)
            for proj in ("gate_up_proj", "down_proj"):
                p = getattr(experts, proj, None)
                if isinstance(p, torch.Tensor) and p.dim() == 3:
                    g = (100 * p.grad.float()) ** 2
                    sums[b, proj] = g if (b, proj) not in sums else sums[b, proj] + g
    return {k: v.sqrt() for k, v in sums.items()}


@pytest.mark.parametrize("n,m", PATTERNS, ids=PATTERN_IDS)
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_gblm_experts_restated(family, n, m):
    """GBLM: each expert with its routed tokens' H and its slice of the gradient norm."""
    model = _moe_model(family)
    dense = copy.deepcopy(model)
    ids = calib_ids(NSAMPLES, SEQLEN)
    grads = _gradient_norms(dense, ids)
    report = _prune(model, "gblm", 0.5, n, m)
    for b in range(len(model.model.layers)):
        _load_pruned_blocks(dense, model, b)
        _restate_fused_block(family, dense, model, report, b, ids, "gblm", 0.5, n, m, grads=grads)


# ---------------------------------------------------------------- 3. moe_calibration="all"


def test_moe_calibration_all_restated():
    model = tiny_moe_model("mixtral")
    dense = copy.deepcopy(model)
    report = _prune(model, "sparsegpt", moe_calibration="all")
    assert report.totals["moe_calibration"] == "all"
    experts = [lr for lr in report.layers if "experts" in lr.name]
    assert len(experts) == 2 * 2 * 4
    for lr in experts:
        assert lr.info["tokens"] == TOKENS, (lr.name, lr.info.get("tokens"))
    ids = calib_ids(NSAMPLES, SEQLEN)
    # block 1 also checks that the block's output (what block 1 is calibrated on) still
    # follows the router: "all" changes the Hessians only
    for b in range(2):
        _load_pruned_blocks(dense, model, b)
        _restate_fused_block("mixtral", dense, model, report, b, ids, "sparsegpt", 0.5, 0, 0, True)


def test_moe_calibration_all_differs_from_routed():
    """The restatement above can tell "all" from "routed": the two prune differently."""
    a, r = _moe_model("mixtral"), _moe_model("mixtral")
    _prune(a, "sparsegpt", moe_calibration="all")
    _prune(r, "sparsegpt", moe_calibration="routed")
    ga, gr = a.model.layers[0].mlp.experts.gate_up_proj, r.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(ga, gr)


# ------------------------------------------------------------- 4. an expert without tokens


def test_expert_without_tokens(caplog):
    """Expert 3 of block 0 is never routed to: every token's block-0 hidden state has a huge
    positive coordinate 0 (set in every embedding row; block 0's attention is made blind to
    it, so its output stays small and varied), so after the RMSNorm h_0 > 0 dominates, and
    router row 3 = -100 e_0 gives expert 3 a logit far below every other (rows 0..2 ignore
    coordinate 0 so routing among them stays varied). Block 1 sees the same huge coordinate
    and its routing collapses onto two experts: more experts without tokens, checked alike."""
    model = tiny_moe_model("mixtral")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0
        model.model.layers[0].self_attn.v_proj.weight[:, 0] = 0.0
        gate = model.model.layers[0].mlp.gate.weight
        gate[:3, 0] = 0.0
        gate[3] = 0.0
        gate[3, 0] = -100.0
    dense = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="fastprune"):
        report = _prune(model, "sparsegpt")
    by_name = _by_name(report)
    lost = [f"0.mlp.experts.{p}[3]" for p in ("gate_up_proj", "down_proj")]
    for name in lost:
        assert by_name[name].info["tokens"] == 0, (name, by_name[name].info.get("tokens"))
    for e in range(3):  # the others did get tokens
        assert by_name[f"0.mlp.experts.gate_up_proj[{e}]"].info["tokens"] > 0
    without = report.totals.get("experts_without_tokens")
    assert without is not None and set(lost) <= set(without), without
    zero_tok = {x for x, lr in by_name.items() if lr.info.get("tokens") == 0}
    assert set(without) == zero_tok
    warned = [
        rec
        for rec in caplog.records
        if rec.name == "fastprune" and rec.levelno == logging.WARNING and "[3]" in rec.getMessage()
    ]
    assert warned, [rec.getMessage() for rec in caplog.records]

    # every expert layer without tokens (block 1's too): SparseGPT with H = I, i.e. magnitude
    # pruning within 128-column blocks and no weight updates
    for name in without:
        W0 = _layer_matrix(dense.model.layers, name, False).contiguous()
        Wp = _layer_matrix(model.model.layers, name, False)
        want = fastprune.sparsegpt_layer(W0, torch.eye(W0.shape[1]), 0.5, 0, 0)
        assert torch.equal(Wp != 0, want.mask), f"{name}: mask is not magnitude's (H = I)"
        assert torch.equal(Wp, want.weight), f"{name}: weights differ from H = I's"
        # H = I: no updates, the kept weights are the dense ones
        assert torch.equal(Wp[want.mask], W0[want.mask])
        assert int((Wp == 0).sum()) == int((~want.mask).sum())
        assert abs(int((Wp == 0).sum()) / Wp.numel() - 0.5) < 0.01
        assert by_name[name].sparsity == pytest.approx(int((Wp == 0).sum()) / Wp.numel())


# ---------------------------------------------------------------------- 5. coverage errors


def test_unknown_parameter_is_an_error_naming_it():
    model = tiny_moe_model("mixtral")
    model.model.layers[0].mlp.register_parameter("mystery", nn.Parameter(torch.randn(2, 3, 4)))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as ei:
        _prune(model, "wanda")
    msg = str(ei.value)
    assert "mlp.mystery" in msg and "ignore" in msg, msg
    for k, v in model.state_dict().items():  # refused before any work
        assert torch.equal(v, before[k]), k

    mystery = model.model.layers[0].mlp.mystery.detach().clone()
    report = _prune(model, "wanda", ignore=["mlp.mystery"])
    dense = [d for d in report.dense if d["name"] == "0.mlp.mystery"]
    assert dense == [{"name": "0.mlp.mystery", "shape": [2, 3, 4], "reason": "ignored (ignore=)"}]
    assert torch.equal(model.model.layers[0].mlp.mystery, mystery)
    assert any(lr.name.startswith("0.mlp.experts.") for lr in report.layers)


def test_ignore_matching_nothing_is_an_error():
    model = tiny_moe_model("mixtral")
    with pytest.raises(ValueError, match="ignore"):
        _prune(model, "wanda", ignore=["no_such_layer_xyz"])


def test_bad_moe_calibration():
    model = tiny_moe_model("mixtral")
    with pytest.raises(ValueError, match="moe_calibration"):
        _prune(model, "wanda", moe_calibration="bogus")


def test_ignore_fused_experts_leaves_them_dense():
    model = tiny_moe_model("mixtral")
    dense = copy.deepcopy(model)
    report = _prune(model, "wanda", ignore=["mlp.experts.down_proj"])
    for i in range(2):
        assert {"name": f"{i}.mlp.experts.down_proj", "shape": [4, 64, 32],
                "reason": "ignored (ignore=)"} in report.dense  # fmt: skip
        assert torch.equal(
            model.model.layers[i].mlp.experts.down_proj, dense.model.layers[i].mlp.experts.down_proj
        )
        assert not any(lr.name.startswith(f"{i}.mlp.experts.down_proj") for lr in report.layers)
        gu = model.model.layers[i].mlp.experts.gate_up_proj
        assert (gu == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------- 6. ModuleList experts


class _ExpertMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ListMoE(nn.Module):
    """Top-k MoE with experts kept as an nn.ModuleList, each called on its routed tokens."""

    def __init__(self, hidden: int = 64, inter: int = 32, experts: int = 4, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList([_ExpertMLP(hidden, inter) for _ in range(experts)])

    def route(self, x):
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        return (w / w.sum(-1, keepdim=True)).to(x.dtype), idx

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        w, idx = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, pos = torch.where(idx == e)
            if tok.numel() == 0:
                continue
            out.index_add_(0, tok, expert(x[tok]) * w[tok, pos, None])
        return out.reshape(shape)


def _list_moe_model(seed: int = 0):
    model = tiny_model("llama", seed=seed)
    torch.manual_seed(seed + 100)
    for layer in model.model.layers:
        moe = ListMoE(model.config.hidden_size)
        for p in moe.parameters():
            nn.init.normal_(p, std=0.2)
        layer.mlp = moe
    return model.eval()


@torch.no_grad()
def _mlp_inputs(model, b: int, ids):
    xs = []

    def hook(_mod, args):
        xs.append(args[0].reshape(-1, args[0].shape[-1]).detach().clone())

    h = model.model.layers[b].mlp.register_forward_pre_hook(hook)
    try:
        for s in range(ids.shape[0]):
            model(ids[s : s + 1], use_cache=False)
    finally:
        h.remove()
    return torch.cat(xs)


@pytest.mark.parametrize("n,m", PATTERNS, ids=PATTERN_IDS)
@pytest.mark.parametrize("moe_calibration", ["routed", "all"])
def test_modulelist_experts(moe_calibration, n, m):
    model = _list_moe_model()
    dense = copy.deepcopy(model)
    report = _prune(model, "sparsegpt", 0.5, n, m, moe_calibration=moe_calibration)
    by_name = _by_name(report)
    nb = len(model.model.layers)
    assert sorted((d["name"], d["reason"], tuple(d["shape"])) for d in report.dense) == [
        (f"{i}.mlp.gate.weight", "router", (4, 64)) for i in range(nb)
    ]
    assert report.totals["moe_calibration"] == moe_calibration
    ids = calib_ids(NSAMPLES, SEQLEN)
    for b in range(nb):
        assert torch.equal(model.model.layers[b].mlp.gate.weight,
                           dense.model.layers[b].mlp.gate.weight)  # fmt: skip
        _load_pruned_blocks(dense, model, b)
        moe = dense.model.layers[b].mlp
        x = _mlp_inputs(dense, b, ids)
        assert x.shape[0] == TOKENS
        _, idx = moe.route(x)
        counts = []
        for e in range(4):
            xe = x if moe_calibration == "all" else x[(idx == e).any(-1)]
            counts.append(xe.shape[0])
            ex = moe.experts[e]
            mid = F.silu(F.linear(xe, ex.gate_proj.weight)) * F.linear(xe, ex.up_proj.weight)
            Hin, Hmid = _gram(xe), _gram(mid)
            for proj, H in (("gate_proj", Hin), ("up_proj", Hin), ("down_proj", Hmid)):
                name = f"{b}.mlp.experts.{e}.{proj}"
                lr = by_name[name]
                assert lr.info.get("tokens") == xe.shape[0], (name, lr.info.get("tokens"))
                W0 = getattr(ex, proj).weight.detach()
                Wp = getattr(model.model.layers[b].mlp.experts[e], proj).weight.detach()
                r = _solve("sparsegpt", W0, H, 0.5, n, m)
                nd = _assert_same_prune(name, Wp, r.weight)
                _check_loss(name, lr, r, nd)
                if n:
                    _check_nm(name, Wp, n, m)
                else:
                    assert int((Wp == 0).sum()) == int((~r.mask).sum())
        if moe_calibration == "routed":
            assert sum(counts) == TOKENS * 2
            assert all(c > 0 for c in counts), counts  # else this test proves less
        else:
            assert counts == [TOKENS] * 4
    with torch.no_grad():
        assert torch.isfinite(model(ids[:2], use_cache=False).logits).all()


# ------------------------------------------------------------------ 7. empty batches


@pytest.mark.parametrize("shape", [(1, 0, 8), (0, 8)], ids=["1x0xcols", "0xcols"])
def test_hessian_accumulator_ignores_empty_batches(shape):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, generator=g)
    acc = HessianAccumulator(8)
    acc.add_batch(torch.zeros(shape))
    assert acc.nsamples == 0
    assert torch.equal(acc.H, torch.zeros(8, 8))
    acc.add_batch(torch.zeros(shape))
    acc.add_batch(x)
    ref = HessianAccumulator(8)
    ref.add_batch(x)
    assert acc.nsamples == ref.nsamples == 2
    assert torch.equal(acc.H, ref.H)
    # per-token form, as the experts are fed: [tokens, 1, cols], each token one sample
    acc2 = HessianAccumulator(8)
    acc2.add_batch(torch.zeros(shape))
    tokens = x.reshape(-1, 8)
    acc2.add_batch(tokens[:, None, :])
    assert acc2.nsamples == 10
    want = (2.0 / 10 * tokens.double().t() @ tokens.double()).float()
    torch.testing.assert_close(acc2.H, want, rtol=1e-5, atol=1e-6)
