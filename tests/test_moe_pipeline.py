"""MoE models through the rest of the pipeline: GBLM's per-expert gradient norms, OWL over
the experts, save and reload of fused expert parameters, and the CLI's MoE flags."""

from __future__ import annotations

import copy

import pytest
import torch
from pipeline_helpers import byte_tokenizer, calib_ids, tiny_moe_model

import fastprune as fp
from fastprune.app.cli import main
from fastprune.layers import get_weight
from fastprune.models import find_blocks
from fastprune.pipeline.block_layers import find_block_layers


def test_gblm_gradient_norm_of_an_expert_is_its_slice():
    """G of `mlp.experts.down_proj[e]` is the l2 norm over samples of 100 x that expert's
    slice of the fused parameter's gradient (restated with plain autograd)."""
    model = tiny_moe_model("gpt_oss")
    calib = calib_ids(3, 16)
    names = [
        f"model.layers.1.mlp.experts.{p}[{e}]"
        for p in ("gate_up_proj", "down_proj")
        for e in (0, 3)
    ]
    G = fp.compute_gradient_norms(copy.deepcopy(model), calib, names)
    experts = model.model.layers[1].mlp.experts
    sums = {p: 0.0 for p in ("gate_up_proj", "down_proj")}
    for i in range(calib.shape[0]):
        model.zero_grad()
        x = calib[i : i + 1]
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        for p in sums:
            sums[p] = sums[p] + (100 * getattr(experts, p).grad) ** 2
    for p in sums:
        for e in (0, 3):
            want = sums[p][e].sqrt().t()  # gpt-oss stores experts [in, out]
            torch.testing.assert_close(
                G[f"model.layers.1.mlp.experts.{p}[{e}]"], want, rtol=1e-5, atol=1e-6
            )


def test_owl_allocates_over_every_expert():
    """OWL's per-block sparsities cover the experts: the pruned weights of each block
    (attention and every expert) meet that block's allocated sparsity, and the total stays
    the target within each layer's rounding."""
    model = tiny_moe_model("mixtral")
    rep = fp.prune_model(
        model, calib_ids(4, 32), method="wanda", sparsity=0.5, allocation="owl", progress=False
    )
    alloc = rep.totals["allocation"]["block_sparsity"]
    assert len(alloc) == 2 and alloc[0] != alloc[1]
    for b, target in enumerate(alloc):
        lrs = [lr for lr in rep.layers if lr.block == b]
        assert any("experts" in lr.name for lr in lrs)
        for lr in lrs:  # Wanda: int(cols * sparsity) per row
            assert lr.sparsity == pytest.approx(int(lr.shape[1] * target) / lr.shape[1])
    assert rep.achieved_sparsity == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe"])
def test_save_and_reload_keeps_fused_experts(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from fastprune.app.saving import save_pruned, verify_saved

    model = tiny_moe_model(family)
    rep = fp.prune_model(
        model,
        calib_ids(4, 32),
        method="sparsegpt",
        sparsity=0.5,
        prune_n=2,
        prune_m=4,
        progress=False,
    )
    out = save_pruned(model, byte_tokenizer(), tmp_path / "pruned", rep)
    checked = verify_saved(model, out, rep, calib_ids(1, 16)[0])
    assert checked["block_sparsity"] == pytest.approx(rep.block_sparsity)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    mine = model.model.layers[1].mlp.experts
    theirs = loaded.model.layers[1].mlp.experts
    for p in ("gate_up_proj", "down_proj"):
        assert getattr(theirs, p).shape == getattr(mine, p).shape
        assert torch.equal(getattr(theirs, p), getattr(mine, p))
    # a changed expert weight in the saved copy is caught
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2].view(-1)[0] += 1.0
    with pytest.raises(ValueError, match=r"down_proj\[2\]"):
        verify_saved(model, out, rep)


def _moe_dir(tmp_path, family="mixtral"):
    d = tmp_path / family
    tiny_moe_model(family).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def test_cli_prunes_a_moe_model(tmp_path, capsys):
    d = _moe_dir(tmp_path)
    argv = ["prune", "--model", str(d), "--method", "sparsegpt", "--nsamples", "2"]
    argv += ["--seqlen", "32", "--eval-windows", "2", "--no-progress", "--moe-calibration", "all"]
    argv += ["--report", str(tmp_path / "r.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mlp.experts.gate_up_proj" in out and "left dense: mlp.gate.weight" in out
    assert "moe_calibration=all" in out
    import json

    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["dense"] and all(d["reason"] == "router" for d in doc["dense"])
    assert 0 < doc["block_sparsity"] <= doc["achieved_sparsity"]


def test_cli_refuses_bad_moe_flags_before_loading(tmp_path, capsys, monkeypatch):
    d = _moe_dir(tmp_path)
    base = ["prune", "--model", str(d), "--nsamples", "2", "--seqlen", "32", "--no-progress"]
    with pytest.raises(SystemExit):
        main([*base, "--moe-calibration", "sometimes"])
    assert "--moe-calibration" in capsys.readouterr().err

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("fastprune.models.load_model", no_load)
    assert main([*base, "--ignore", "mlp.experts.nope"]) == 2
    err = capsys.readouterr().err
    assert "ignore pattern 'mlp.experts.nope' matches no layer" in err
    assert "mlp.experts.down_proj" in err  # the names it could have matched


def test_expert_names_can_be_targeted_and_ignored():
    model = tiny_moe_model("qwen3_moe")
    _, blocks = find_blocks(model)
    bl = find_block_layers(blocks[0], ignore=["mlp.experts.down_proj"])
    assert not any("down_proj[" in k for k in bl.layers)
    assert {d.name: d.reason for d in bl.dense}["mlp.experts.down_proj"] == "ignored (ignore=)"
    bl = find_block_layers(blocks[0], targets=["gate_up_proj"])
    assert set(bl.layers) == {f"mlp.experts.gate_up_proj[{e}]" for e in range(4)}
    W = get_weight(bl.layers["mlp.experts.gate_up_proj[2]"])
    assert W.data_ptr() == blocks[0].mlp.experts.gate_up_proj[2].data_ptr()  # a view
    reasons = {d.name: d.reason for d in bl.dense}
    assert reasons["self_attn.q_proj.weight"] == "not in targets="
    assert reasons["mlp.gate.weight"] == "router"


def test_llama4_experts_grouped_by_the_caller():
    """Llama-4 calls its experts with the tokens already grouped by expert and scaled by
    the router (zero rows where a token is not routed): each expert gets its routed rows."""
    import transformers

    cfg = transformers.Llama4TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=128,
        interleave_moe_layer_step=1, attention_chunk_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    calib = calib_ids(4, 32)
    rep = fp.prune_model(copy.deepcopy(model), calib, method="wanda", sparsity=0.5, progress=False)
    for b in range(2):
        tokens = [
            lr.info["tokens"] for lr in rep.layers if lr.block == b and "gate_up_proj[" in lr.name
        ]
        assert len(tokens) == 4 and sum(tokens) == calib.numel()  # top-1: every token once
    assert {d["reason"] for d in rep.dense} == {"router"}
    with pytest.raises(ValueError, match="moe_calibration='all'"):
        fp.prune_model(
            model, calib, method="wanda", sparsity=0.5, moe_calibration="all", progress=False
        )


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_any_experts_implementation_prunes_alike(family):
    """The experts' inputs are read from the experts module's call, so eager, batched_mm and
    grouped_mm forwards give the same Hessians, hence the same pruned experts."""
    got = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        model = tiny_moe_model(family)
        for block in model.model.layers:
            block.mlp.experts.config._experts_implementation = impl
        rep = fp.prune_model(
            model, calib_ids(4, 32), method="sparsegpt", sparsity=0.5, progress=False
        )
        assert rep.block_sparsity > 0.49
        got[impl] = [b.mlp.experts.down_proj.detach().clone() for b in model.model.layers]
    for impl in ("batched_mm", "grouped_mm"):
        for a, b in zip(got["eager"], got[impl]):
            assert ((a != 0) == (b != 0)).float().mean() >= 0.999, impl
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
