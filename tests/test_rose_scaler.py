"""Method "rose" with `score_scaler="running"`: the ROSE repository's running scaler in the model
pipeline, layer by layer the compat `ROSE` adapter's result on the same inputs."""

from __future__ import annotations

import math

import pytest
import torch
from pipeline_helpers import calib_ids, tiny_model, tiny_moe_model, transformers

import fastprune as fp
from fastprune.app import cli
from fastprune.compat import ROSE
from fastprune.hessian import RunningScaler
from fastprune.models import find_blocks, find_linears, get_weight
from fastprune.pipeline.hessian_hooks import HessianHooks
from fastprune.pipeline.stream import prune_checkpoint

# small blocks (a short last one: 64 = 24 + 24 + 16, so the range rule matters too) and every
# nonzero range reordered, so the scaler decides the column order
OPTS = {"blocksize": 24, "range_threshold": 0.0}


def _compat_oracle(model, calib, batch_size, sparsity, n, m):
    """Block by block, the whole model run on each batch of `calib` (earlier blocks already
    pruned) with a compat `ROSE` adapter on every linear of the block, then each adapter's
    `fasterprune`: the ROSE repository's procedure with fastprune's drop-in."""
    _, blocks = find_blocks(model)
    for block in blocks:
        wrappers = {k: ROSE(mod) for k, mod in find_linears(block).items()}
        for w in wrappers.values():
            w.range_threshold = OPTS["range_threshold"]

        def hook(w):
            return lambda mod, args: w.add_batch(args[0])

        hs = [w.layer.register_forward_pre_hook(hook(w)) for w in wrappers.values()]
        with torch.no_grad():
            for i in range(0, calib.shape[0], batch_size):
                model(input_ids=calib[i : i + batch_size], use_cache=False)
        for h in hs:
            h.remove()
        for w in wrappers.values():
            w.fasterprune(sparsity, n, m, blocksize=OPTS["blocksize"])


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)], ids=["unstructured", "2:4"])
def test_pipeline_running_scaler_is_the_compat_adapters(n, m):
    """Masks equal to the compat adapter's on every layer, weights to float32 rounding; and
    the default scaler (diag(H)/2) gives other masks, so the option is what decides."""
    calib, bs, sparsity = calib_ids(6, 24), 2, 0.5
    ref = tiny_model("llama")
    _compat_oracle(ref, calib, bs, sparsity, n, m)
    kw = dict(sparsity=sparsity, prune_n=n, prune_m=m, batch_size=bs, progress=False, **OPTS)
    got = tiny_model("llama")
    rep = fp.prune_model(got, calib, method="rose", score_scaler="running", **kw)
    assert rep.options["score_scaler"] == "running"
    assert all(lr.info["range_rule"] == "block_sum" for lr in rep.layers)
    _, ref_blocks = find_blocks(ref)
    _, got_blocks = find_blocks(got)
    for i, (rb, gb) in enumerate(zip(ref_blocks, got_blocks)):
        for (name, a), b in zip(find_linears(gb).items(), find_linears(rb).values()):
            Wa, Wb = get_weight(a), get_weight(b)
            assert torch.equal(Wa == 0, Wb == 0), f"{i}.{name}"
            torch.testing.assert_close(Wa, Wb, rtol=1e-4, atol=1e-5, msg=f"{i}.{name}")
    default = tiny_model("llama")
    fp.prune_model(default, calib, method="rose", **kw)
    _, def_blocks = find_blocks(default)
    differ = [
        f"{i}.{name}"
        for i, (db, gb) in enumerate(zip(def_blocks, got_blocks))
        for (name, a), b in zip(find_linears(gb).items(), find_linears(db).values())
        if not torch.equal(get_weight(a) == 0, get_weight(b) == 0)
    ]
    assert differ, "the running scaler changed no mask"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_experts_get_their_own_running_scaler(family, monkeypatch):
    """Every input, experts' included (each token a sample, fused or a ModuleList), has its
    running scaler from the same samples as its H: calibrated in one batch, every sample
    counts `1/N`, so the scaler is `diag(H)/N` exactly (up to rounding)."""
    seen = []
    release = HessianHooks.release

    def record(self, lead):
        acc, sc = self.acc[lead], self.scalers[lead]
        seen.append((lead, acc.nsamples, sc.nsamples, torch.diagonal(acc.H).clone(), sc.scaler_row))
        release(self, lead)

    monkeypatch.setattr(HessianHooks, "release", record)
    calib = calib_ids(4, 16)
    rep = fp.prune_model(
        tiny_moe_model(family), calib, method="rose", score_scaler="running", batch_size=4,
        progress=False, **OPTS,
    )  # fmt: skip
    experts = [lr for lr in rep.layers if "tokens" in lr.info]
    assert experts and all(lr.info["range_rule"] == "block_sum" for lr in rep.layers)
    assert len(seen) == len({lr.hessian for lr in rep.layers})
    for lead, n_h, n_s, diag, scaler in seen:
        assert n_h == n_s, lead
        if n_h:  # an expert no token reached is pruned with H = I
            torch.testing.assert_close(scaler, diag / n_h, rtol=1e-5, atol=0, msg=lead)


def test_streamed_running_scaler_equals_in_memory(tmp_path):
    """`prune_checkpoint` calibrates with the same hooks: the same weights bit for bit."""
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="60KB")
    calib, kw = calib_ids(4, 16), dict(method="rose", score_scaler="running", **OPTS)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    fp.prune_model(model, calib, progress=False, **kw)
    rep = prune_checkpoint(src, tmp_path / "out", calib, progress=False, **kw)
    assert rep.totals["path"] == "streamed" and rep.options["score_scaler"] == "running"
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    want = model.state_dict()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_running_scaler_weights_sample_k_by_one_over_its_count():
    """`(2/N) sum_k ||x_k||^2 / n_k` per channel, float64 truth, batches of 1 and 2."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(b, 5, 3, generator=g) for b in (1, 2, 1)]
    acc = RunningScaler(3)
    for x in xs:
        acc.add_batch(x)
    acc.add_batch(torch.zeros(0, 5, 3))  # no tokens: nothing added, nothing counted
    samples = torch.cat(xs).double()  # [N, tokens, cols]
    N, seen, want = samples.shape[0], 0, torch.zeros(3, dtype=torch.float64)
    for x in xs:
        seen += x.shape[0]
        want += x.double().square().sum((0, 1)) / seen  # the batch's samples: 1/n_k each
    want *= 2 / N
    assert acc.nsamples == N
    torch.testing.assert_close(acc.scaler_row.double(), want, rtol=1e-6, atol=0)
    equal = samples.square().sum((0, 1)) / N  # diag(H)/2 weighs every sample 1/N
    assert not torch.allclose(want, equal)
    assert math.isclose(want.sum().item(), acc.scaler_row.sum().item(), rel_tol=1e-6)


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)], ids=["unstructured", "2:4"])
def test_composition_selects_with_the_running_scaler(n, m):
    """ROSE's mask with the running scaler, then the least-squares refit: in the first block
    (the same inputs) every mask is plain `score_scaler="running"` ROSE's, every weight the
    refit of ROSE's weights on it; a scaler given to a selector that takes none is refused."""
    calib = calib_ids(4, 24)
    kw = dict(sparsity=0.5, prune_n=n, prune_m=m, batch_size=2, progress=False, **OPTS)
    plain, refit = tiny_model("llama"), tiny_model("llama")
    rep = fp.prune_model(plain, calib, method="rose", score_scaler="running", **kw)
    got = fp.prune_model(
        refit, calib, method="rose", score_scaler="running", reconstruct="lstsq", **kw
    )
    assert got.method == "rose+lstsq" and got.options["score_scaler"] == "running"
    first = [lr for lr in got.layers if lr.block == 0]
    assert first and all(lr.info["result"] == "refit" for lr in first)
    assert all(lr.info["range_rule"] == "block_sum" for lr in first)
    _, pb = find_blocks(plain)
    _, rb = find_blocks(refit)
    for name, a in find_linears(rb[0]).items():
        b = find_linears(pb[0])[name]
        assert torch.equal(get_weight(a) == 0, get_weight(b) == 0), name
    before = {lr.name: lr.loss for lr in rep.layers if lr.block == 0}
    assert all(lr.loss <= before[lr.name] * (1 + 1e-6) for lr in first)
    W, Hm, _ = fp.testing.random_layer(8, 32)
    with pytest.raises(ValueError, match="scaler is taken by a selector"):
        fp.compose_layer(W, Hm, select="sparsegpt", scaler=torch.ones(32), reconstruct="lstsq")


def test_running_scaler_refusals():
    """The fastprune recipe takes no score_scaler: refused naming the option, as is an
    unknown value."""
    model, calib = tiny_model("llama"), calib_ids(2, 16)
    with pytest.raises(TypeError, match="does not take score_scaler"):
        fp.prune_model(model, calib, method="fastprune", score_scaler="running")
    with pytest.raises(ValueError, match="score_scaler must be one of hessian, running"):
        fp.prune_model(model, calib, method="rose", score_scaler="diag")
    with pytest.raises(ValueError, match="score_scaler must be one of"):
        fp.METHODS["rose"].check_options({"score_scaler": "Running"})
    # a solve outside the pipeline must be handed the scaler it reads
    meth = fp.METHODS["rose"]
    opts = meth.check_options({"score_scaler": "running"})
    W, H, _ = fp.testing.random_layer(8, 32)
    with pytest.raises(ValueError, match="running scaler.*scaler_row"):
        meth.solve(W, H, None, 0.5, 0, 0, opts)
    r = meth.solve(W, H, None, 0.5, 0, 0, opts, scaler_row=torch.diagonal(H) / 2)
    assert r.info["range_rule"] == "block_sum"


def test_running_scaler_refused_under_several_processes(monkeypatch):
    """Ranks hold shards of the samples, so none has a sample's place in the whole order."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="score_scaler='running'.*one process"):
        fp.METHODS["rose"].check_options({"score_scaler": "running"})
    assert fp.METHODS["rose"].check_options({})["score_scaler"] == "hessian"


def test_cli_scaler_flag_reaches_the_method():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["prune", "--model", "m", "--method", "rose", "--score-scaler", "running"]
    )
    job = cli.prune_job(args)
    assert job.options["score_scaler"] == "running"
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "--model", "m", "--score-scaler", "sometimes"])
