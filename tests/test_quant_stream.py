"""Quantized prunes streamed (`prune_checkpoint(quant=...)`, `fastprune prune --stream
--quant`): block by block into the compressed-tensors checkpoint the in-memory save of the
same prune writes, tensor for tensor and bit for bit, with the same config; transformers loads
it; the streaming loader reads such a checkpoint back (dequantized) for the verification and
the perplexity of the output; what cannot be written is refused before anything is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import byte_tokenizer, calib_ids, tiny_model, tiny_moe_model

import fastprune as fp
from fastprune.app.cli import main
from fastprune.app.saving import save_pruned, verify_saved
from fastprune.evaluate import perplexity
from fastprune.pipeline.stream import prune_checkpoint, streamed_perplexity, verify_streamed_prune
from fastprune.streaming import open_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

SHARD = "60KB"  # several shards in and out

CASES = {
    "llama-int4-g32-asym": (
        "llama",
        dict(method="sparsegpt", quant="w4a16", group_size=32, sym=False),
    ),  # fmt: skip
    "llama-gptq-int8": ("llama", dict(method="gptq", sparsity=0.0, quant="w8a16")),
    "mixtral-int4-g32": ("mixtral", dict(method="sparsegpt", quant="w4a16", group_size=32)),
    "qwen3_moe-fp8-2:4": (
        "qwen3_moe",
        dict(method="sparsegpt", prune_n=2, prune_m=4, quant="fp8"),
    ),  # fmt: skip
}


def _source(family: str, folder: Path) -> Path:
    """A tiny checkpoint; `qwen3_moe-fused`: its experts stored as transformers holds them,
    one 3-D tensor each (not the per-expert linears `save_pretrained` writes)."""
    if family.endswith("-fused"):
        from safetensors.torch import save_file

        model = tiny_moe_model(family[: -len("-fused")])
        state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        folder.mkdir(parents=True)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(folder)
        return folder
    model = tiny_model(family) if family in ("llama", "gpt2") else tiny_moe_model(family)
    model.save_pretrained(folder, max_shard_size=SHARD)
    return folder


def _load(folder, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, **kw
    ).eval()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.element_size() == 1:  # float8: compare the bytes
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_streamed_quantized_prune_is_the_in_memory_save(tmp_path, case):
    family, kw = CASES[case]
    kw = {"sparsity": 0.5, **kw}
    src = _source(family, tmp_path / "src")
    model = _load(src)
    calib = calib_ids(4, 16)
    ref = fp.prune_model(model, calib, progress=False, **kw)
    save_pruned(model, None, tmp_path / "memory", ref)
    out = tmp_path / "streamed"
    rep = prune_checkpoint(src, out, calib, progress=False, max_shard_bytes=60_000, **kw)
    # the same solves: masks, losses, grids
    assert [lr.name for lr in rep.layers] == [lr.name for lr in ref.layers]
    for a, b in zip(rep.layers, ref.layers):
        assert (a.sparsity, a.loss, a.info["quant"]) == (b.sparsity, b.loss, b.info["quant"])
    assert rep.totals["quant"] == ref.totals["quant"]
    assert rep.quantized == {}  # the codes went to disk block by block
    assert len(list(out.glob("*.safetensors"))) >= 3
    # the same tensors (codes, scales, zero points, shapes; the rest as it was), same config
    got, want = _tensors(out), _tensors(tmp_path / "memory")
    assert got.keys() == want.keys()
    bad = [k for k in want if not _same(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, first {bad[:3]}"
    assert any(k.endswith(("weight_packed", "weight_scale")) for k in got)
    cfg_got, cfg_want = (
        json.loads((d / "config.json").read_text()) for d in (out, tmp_path / "memory")
    )
    assert (
        cfg_got == cfg_want
        and cfg_got["quantization_config"]["format"] == (rep.totals["compressed"]["format"])
    )
    # transformers loads it: every pruned weight and the logits equal the in-memory model's
    x = calib_ids(1, 32, seed=3)[0]
    assert verify_saved(model, out, ref, x)["max_logit_diff"] == 0.0
    # the streaming loader reads it back dequantized: verified block by block
    check = verify_streamed_prune(out, rep)
    assert check["verified"] == check["tensors"] and check["block_sparsity"] == rep.block_sparsity


def test_streaming_loader_reads_a_quantized_checkpoint_exactly(tmp_path):
    """Every parameter read back from a compressed-tensors checkpoint equals the quantized
    model in memory bit for bit; the streamed perplexity equals transformers' on it."""
    model = tiny_moe_model("mixtral")
    report = fp.prune_model(model, calib_ids(4, 32), method="sparsegpt", sparsity=0.5,
                            quant="w4a16", group_size=32, progress=False)  # fmt: skip
    out = save_pruned(model, None, tmp_path / "q", report)
    ckpt = open_checkpoint(out)
    assert ckpt.quant == {"num_bits": 4, "type": "int", "symmetric": True}
    skeleton = ckpt.skeleton(torch.float32)
    ckpt.load(skeleton, "")
    mine = dict(model.named_parameters())
    for name, p in skeleton.named_parameters():
        assert torch.equal(p, mine[name]), name
    ids = calib_ids(3, 16, seed=4).reshape(-1)
    got = streamed_perplexity(out, ids, 16)
    want = perplexity(model, ids, 16, progress=False)
    assert got["nll"] == pytest.approx(want["nll"], rel=1e-5)


@pytest.mark.parametrize(
    "family,kw,needle",
    [
        ("gpt_oss", dict(quant="w8a16"), "stored transposed"),
        ("qwen3_moe", dict(quant="w8a16", ignore=["*down_proj*"]), "left dense"),
        ("qwen3_moe", dict(quant="w4a16", group_size=32, sym=False), "asymmetric grid"),
        ("llama", dict(quant="w4a16", group_size=48), "not a whole number of groups of 48"),
        ("llama", dict(quant="w4a16", group_size=32, actorder=True), "actorder with groups"),
        ("gpt2", dict(quant="w8a16"), r"\(Conv1D\) is not an nn.Linear"),
        ("qwen3_moe-fused", dict(quant="w8a16"), "stores its experts fused"),
    ],
)
def test_what_cannot_be_written_is_refused_before_writing(tmp_path, family, kw, needle):
    src = _source(family, tmp_path / "src")
    with pytest.raises(ValueError, match=needle):
        prune_checkpoint(src, tmp_path / "out", calib_ids(2, 16), method="sparsegpt",
                         progress=False, **kw)  # fmt: skip
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_cli_streams_a_quantized_prune(tmp_path, capsys):
    """`--stream --quant` and `--no-stream --quant`: the same perplexities and checkpoint."""
    src = _source("llama", tmp_path / "src")
    byte_tokenizer().save_pretrained(src)
    flags = ["--model", str(src), "--method", "sparsegpt", "--quant", "w4a16"]
    flags += ["--group-size", "32", "--nsamples", "3", "--seqlen", "16", "--eval-windows", "2"]
    runs = {}
    for label, extra in (("memory", "--no-stream"), ("streamed", "--stream")):
        out, rep = tmp_path / label, tmp_path / f"{label}.json"
        argv = ["prune", *flags, extra, "--no-progress", "--save", str(out), "--report", str(rep)]
        assert main(argv) == 0
        runs[label] = json.loads(rep.read_text())
    mem, st = runs["memory"], runs["streamed"]
    assert st["path"] == "streamed" and mem["path"] == "in memory"
    assert st["ppl_pruned"] == pytest.approx(mem["ppl_pruned"], rel=1e-6)
    assert st["saved"]["verified"] == st["saved"]["tensors"]
    got, want = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "memory")
    assert got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    assert "quant: int4 groups of 32" in capsys.readouterr().out


def test_a_compressed_format_not_read_block_by_block_is_refused():
    from fastprune.streaming.compressed import scheme_args

    group = {"weights": {"num_bits": 8, "type": "int", "symmetric": True}}
    qc = {"quant_method": "compressed-tensors", "format": "int-quantized"}
    with pytest.raises(ValueError, match="'int-quantized' format is not read block by block"):
        scheme_args({"quantization_config": {**qc, "config_groups": {"group_0": group}}})
    assert scheme_args({"model_type": "llama"}) is None
    qc["format"] = "pack-quantized"
    got = scheme_args({"quantization_config": {**qc, "config_groups": {"group_0": group}}})
    assert got == {"num_bits": 8, "type": "int", "symmetric": True}
