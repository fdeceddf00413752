"""Damping chosen per layer on a held-out slice of the calibration samples
(`damping_levels`): the layer-level choice, the hooks' split of H, and the pipeline."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import calib_ids, tiny_model, tiny_moe_model

import fastprune as fp
from fastprune.app import cli
from fastprune.hessian import HessianAccumulator
from fastprune.models import find_blocks, find_linears, get_weight
from fastprune.pipeline.hessian_hooks import HessianHooks
from fastprune.solvers.recipes import (
    HELD_OUT_EVERY,
    HELD_OUT_REFIT_ITERS,
    check_damping_levels,
    compose_layer,
    held_out_damping,
)

LEVELS = (0.01, 0.05, 0.2)


def _hessian(X: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(X.shape[-1])
    acc.add_batch(X)
    return acc.H


def _split_layer(rows, cols, gen, shift=0.5):
    """A layer whose held-out samples come from another distribution than the fitted ones,
    so that the damping the held-out loss prefers is not the smallest."""
    W = torch.randn(rows, cols, generator=gen)
    X_fit = torch.randn(3, 2 * cols, cols, generator=gen)
    X_held = torch.randn(1, 2 * cols, cols, generator=gen) + shift * torch.randn(
        cols, generator=gen
    )
    H_fit, H_held = _hessian(X_fit), _hessian(X_held)
    return W, (3 * H_fit + H_held) / 4, H_fit, H_held


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4), (4, 8)], ids=["50%", "2:4", "4:8"])
@pytest.mark.parametrize("shape", [(1, 16), (13, 40), (32, 64)])
def test_the_level_with_the_lowest_held_out_loss_solves_on_the_whole_h(shape, n, m, gen):
    """Each level's score is the loss under H_held of its solve on H_fit; the result is the
    plain solve on H at the lowest-scoring level, bit for bit."""
    W, H, H_fit, H_held = _split_layer(*shape, gen)
    kw = dict(select="sparsegpt", reconstruct="lstsq", blocksize=8)
    r = compose_layer(W, H, 0.5, n, m, damping_levels=LEVELS, held_out=(H_fit, H_held), **kw)
    scores = r.info["held_out_losses"]
    assert set(scores) == set(LEVELS)
    for d in LEVELS:  # the trial solves stop their refit early: they only rank the levels
        fit = compose_layer(W, H_fit, 0.5, n, m, percdamp=d, refit_iters=HELD_OUT_REFIT_ITERS, **kw)
        assert scores[d] == pytest.approx(fp.layer_loss(W, fit.weight, H_held), rel=1e-12)
    best = min(scores, key=scores.get)
    assert r.info["percdamp_chosen"] == best
    plain = compose_layer(W, H, 0.5, n, m, percdamp=best, **kw)
    assert torch.equal(r.weight, plain.weight) and torch.equal(r.mask, plain.mask)
    assert r.loss == plain.loss


@pytest.mark.parametrize("shape", [(1, 16), (7, 33), (24, 48)])
def test_an_overfitted_fit_takes_the_heavier_damping(shape, gen):
    """Fitted on fewer samples than inputs (a rank-deficient H_fit) and scored on many fresh
    ones, the light damping's refit fits noise the held-out samples do not share: the heavy
    level is chosen."""
    rows, cols = shape
    W = torch.randn(rows, cols, generator=gen)
    H_fit = _hessian(torch.randn(1, cols // 2, cols, generator=gen))
    H_held = _hessian(torch.randn(1, 8 * cols, cols, generator=gen))
    r = compose_layer(W, (H_fit + H_held) / 2, select="sparsegpt", reconstruct="lstsq",
                      damping_levels=(0.001, 0.3), held_out=(H_fit, H_held))  # fmt: skip
    assert r.info["percdamp_chosen"] == 0.3, r.info["held_out_losses"]


def test_no_held_out_samples_keeps_percdamp(gen):
    W, H, _, _ = _split_layer(8, 32, gen)
    r = compose_layer(W, H, select="sparsegpt", reconstruct="lstsq", damping_levels=LEVELS,
                      percdamp=0.02)  # fmt: skip
    plain = compose_layer(W, H, select="sparsegpt", reconstruct="lstsq", percdamp=0.02)
    assert r.info["held_out"] == "none" and r.info["percdamp_chosen"] == 0.02
    assert torch.equal(r.weight, plain.weight)


def test_damping_levels_refusals(gen):
    W, H, H_fit, H_held = _split_layer(8, 32, gen)
    assert check_damping_levels([0.1, 0.01, 0.1]) == (0.01, 0.1)
    assert check_damping_levels(None) is None
    with pytest.raises(ValueError, match="at least one"):
        check_damping_levels([])
    with pytest.raises(TypeError, match="damping_levels must be a sequence"):
        check_damping_levels("0.01")
    with pytest.raises(ValueError, match="percdamp"):
        check_damping_levels([0.01, -0.5])
    with pytest.raises(ValueError, match="rows= cannot"):
        compose_layer(W, H, reconstruct="lstsq", damping_levels=LEVELS, rows=slice(0, 4))
    with pytest.raises(ValueError, match="H_held must be a tensor of H's shape"):
        held_out_damping(W, H, 0.5, 0, 0, LEVELS, (H_fit, H_held[:4, :4]))
    opts = fp.METHODS["fastprune"].check_options({"damping_levels": [0.05, 0.01]})
    assert opts["damping_levels"] == (0.01, 0.05)
    assert not fp.METHODS["fastprune"].separable(0, opts)
    assert fp.METHODS["fastprune"].wants_held_out(opts)
    assert not fp.METHODS["fastprune"].wants_held_out(fp.METHODS["fastprune"].check_options({}))


def _q_inputs(model, calib) -> list[torch.Tensor]:
    """The inputs of block 0's q_proj, one per calibration sample, in the dense model."""
    _, blocks = find_blocks(model)
    q = find_linears(blocks[0])["self_attn.q_proj"]
    seen = []
    h = q.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for i in range(calib.shape[0]):
            model(input_ids=calib[i : i + 1], use_cache=False)
    h.remove()
    return seen


def test_hooks_hold_out_every_fourth_batch(monkeypatch):
    """Block 0 sees the dense model's inputs: the held-out H is that of samples 3 and 7 (of 8,
    one per batch), the fitted H that of the other six."""
    calib = calib_ids(2 * HELD_OUT_EVERY, 16)
    xs = _q_inputs(tiny_model("llama"), calib)
    pairs = {}
    release = HessianHooks.release

    def record(self, lead):
        if self.held is not None and lead not in pairs:
            pairs[lead] = self.held_out_pair(lead)
        release(self, lead)

    monkeypatch.setattr(HessianHooks, "release", record)
    rep = fp.prune_model(tiny_model("llama"), calib, method="fastprune", sparsity=0.5,
                         damping_levels=LEVELS, progress=False)  # fmt: skip
    H_fit, H_held = pairs["self_attn.q_proj"]
    held = [x for i, x in enumerate(xs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    fit = [x for i, x in enumerate(xs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    torch.testing.assert_close(H_held, _hessian(torch.cat(held)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(H_fit, _hessian(torch.cat(fit)), rtol=1e-4, atol=1e-4)
    chosen = [lr.info["percdamp_chosen"] for lr in rep.layers]
    assert all(c in LEVELS for c in chosen)
    assert tuple(rep.options["damping_levels"]) == LEVELS


def test_a_single_level_at_percdamp_is_the_plain_recipe():
    """One level equal to percdamp: every layer solves as the recipe does, bit for bit."""
    calib = calib_ids(2 * HELD_OUT_EVERY, 16)
    plain, chosen = tiny_model("llama"), tiny_model("llama")
    kw = dict(method="fastprune", sparsity=0.5, progress=False)
    fp.prune_model(plain, calib, **kw)
    rep = fp.prune_model(chosen, calib, damping_levels=[0.01], **kw)
    assert all(lr.info["percdamp_chosen"] == 0.01 for lr in rep.layers)
    want, got = plain.state_dict(), chosen.state_dict()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_experts_choose_their_own_damping():
    """Routed experts are held out by batch as linears are; an expert no held-out token
    reached keeps percdamp and says so."""
    calib = calib_ids(2 * HELD_OUT_EVERY, 16)
    rep = fp.prune_model(tiny_moe_model("mixtral"), calib, method="fastprune", sparsity=0.5,
                         damping_levels=LEVELS, progress=False)  # fmt: skip
    experts = [lr for lr in rep.layers if "tokens" in lr.info]
    assert experts
    for lr in experts:
        if lr.info.get("held_out") == "none":
            assert lr.info["percdamp_chosen"] == 0.01
        else:
            assert lr.info["percdamp_chosen"] in LEVELS and len(lr.info["held_out_losses"]) == 3


def test_pipeline_refusals(monkeypatch):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs at least 8 batches"):
        fp.prune_model(model, calib_ids(4, 16), method="fastprune", damping_levels=LEVELS)
    with pytest.raises(ValueError, match="needs at least 8 batches"):
        fp.prune_model(model, calib_ids(16, 16), method="fastprune", damping_levels=LEVELS,
                       batch_size=4)  # fmt: skip
    with pytest.raises(ValueError, match="damping_levels takes no asymmetric"):
        fp.prune_model(model, calib_ids(8, 16), method="fastprune", damping_levels=LEVELS,
                       asymmetric=True)  # fmt: skip
    assert all(torch.count_nonzero(get_weight(m)) == get_weight(m).numel()
               for m in find_linears(find_blocks(model)[1][0]).values())  # fmt: skip


def test_cli_flag_reaches_the_method():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["prune", "--model", "m", "--method", "fastprune", "--damping-levels", "0.05,0.01"]
    )
    assert cli.prune_job(args).options["damping_levels"] == (0.01, 0.05)
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "--model", "m", "--damping-levels", "a,b"])


def test_streamed_equals_in_memory(tmp_path):
    """`prune_checkpoint` calibrates with the same hooks: the same weights bit for bit."""
    from pipeline_helpers import transformers

    from fastprune.pipeline.stream import prune_checkpoint

    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="60KB")
    calib = calib_ids(2 * HELD_OUT_EVERY, 16)
    kw = dict(method="fastprune", sparsity=0.5, damping_levels=LEVELS)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    fp.prune_model(model, calib, progress=False, **kw)
    rep = prune_checkpoint(src, tmp_path / "out", calib, progress=False, **kw)
    assert rep.totals["path"] == "streamed"
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    want = model.state_dict()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_refused_under_several_processes(monkeypatch):
    """Ranks hold shards of the samples: none sees the whole calibration's every 4th batch."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    from fastprune.solvers.compositions import composed

    refit = composed(fp.METHODS["sparsegpt"], {"reconstruct": "lstsq"})
    for meth in (fp.METHODS["fastprune"], refit):
        with pytest.raises(ValueError, match="damping_levels.*one process"):
            meth.check_options({"damping_levels": LEVELS, "reconstruct": "lstsq"})
    assert fp.METHODS["fastprune"].check_options({})["damping_levels"] is None
