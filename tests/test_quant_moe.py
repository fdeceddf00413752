"""Quantized MoE experts: the experts of one projection solved as a batch with one grid per
expert (each equal to that expert solved alone), the pipeline keeping every expert's codes,
and the compressed-tensors checkpoint of fused experts (the checkpoint's per-expert linears,
loaded back by transformers equal to the model in memory), with what cannot be saved refused
before the prune."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LAYER_RTOL, relative_error
from op_oracles import layer
from pipeline_helpers import byte_tokenizer, calib_ids, tiny_moe_model

import fastprune as fp
from fastprune.app.cli import main
from fastprune.app.saving import save_pruned, verify_saved
from fastprune.evaluate import perplexity
from fastprune.quant import QuantSpec
from fastprune.solvers.sparsegpt_batched import sparsegpt_experts

transformers = pytest.importorskip("transformers")

SPECS = {
    "int4-g32": QuantSpec(4, 32),
    "int4-g32-asym-actorder": QuantSpec(4, 32, sym=False, actorder=True),
    "int8-channel": QuantSpec(8, None),
    "int4-g64-static": QuantSpec(4, 64, params="static"),
    "fp8": QuantSpec.preset("fp8"),
}
PATTERNS = [(0.5, 0, 0), (0.5, 2, 4), (0.0, 0, 0)]  # 0.0: quantized alone (GPTQ)


def _experts(gen, E, rows, cols, bs=32):
    kinds = ("plain", "columnar", "ill")
    pairs = [layer(gen, rows, cols, kinds[e % 3], blocksize=bs) for e in range(E)]
    return torch.stack([w for w, _ in pairs]), torch.stack([h for _, h in pairs])


def _same_rows(got, want):
    """The rows whose masks and codes agree entirely (rows of an OBS solve are independent
    given their mask and their rounding decisions)."""
    same = (got.mask == want.mask).all(1)
    return same & (got.quant.codes.float() == want.quant.codes.float()).all(1)


def _check_expert(got, want, spec, e):
    """One expert of a batch against its own solve: the same grids and codes on every row
    whose masks and codes agree (at least 90% of them), codes elsewhere one step apart."""
    got, want = _cpu(got), _cpu(want)
    g, w = got.quant, want.quant
    assert g.spec == w.spec == spec and g.codes.dtype == w.codes.dtype
    assert g.codes.shape == w.codes.shape and g.scale.shape == w.scale.shape
    assert (g.g_idx is None) == (w.g_idx is None)
    if g.g_idx is not None:  # act-order: the expert's own column order
        assert torch.equal(g.g_idx, w.g_idx)
    rows = _same_rows(got, want)
    assert rows.float().mean() >= 0.9, f"expert {e}: {int((~rows).sum())} rows differ"
    torch.testing.assert_close(g.scale[rows], w.scale[rows], rtol=1e-5, atol=0)
    if g.zero is not None:
        assert torch.equal(g.zero[rows], w.zero[rows])
    if not spec.fp8:
        assert (g.codes.int() - w.codes.int()).abs().max() <= 1
    assert relative_error(got.weight[rows], want.weight[rows]) <= LAYER_RTOL
    assert torch.equal(got.weight, g.dequantize())
    q1, q2 = got.info["quant"], want.info["quant"]
    assert {k: v for k, v in q1.items() if k != "grid_error"} == {
        k: v for k, v in q2.items() if k != "grid_error"
    }
    assert q1["grid_error"] == pytest.approx(q2["grid_error"], rel=1e-2)


def _cpu(r):
    """A result with its weights, mask and quantized tensors on the CPU."""
    import dataclasses

    q = r.quant
    moved = {f.name: getattr(q, f.name) for f in dataclasses.fields(q)}
    moved = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
    return dataclasses.replace(r, weight=r.weight.cpu(), mask=r.mask.cpu(),
                               quant=dataclasses.replace(q, **moved))  # fmt: skip


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("sparsity,n,m", PATTERNS)
def test_each_quantized_expert_equals_its_own_solve(gen, spec, sparsity, n, m):
    """Every expert of the batch gets its own grids, equal to `sparsegpt_layer(quant=)` on
    that expert alone on every row whose masks and codes agree (a near-tie may round one
    weight the other way in batched arithmetic); codes elsewhere differ by one step."""
    spec = SPECS[spec]
    W, H = _experts(gen, 4, 37, 128)
    got = sparsegpt_experts(W, H, sparsity, n, m, blocksize=32, quant=spec)
    for e in range(W.shape[0]):
        want = fp.sparsegpt_layer(W[e], H[e], sparsity, n, m, blocksize=32, quant=spec)
        _check_expert(got[e], want, spec, e)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", ["int4-g32", "int4-g32-asym-actorder", "fp8"])
@pytest.mark.parametrize("sparsity,n,m", [(0.5, 0, 0), (0.5, 2, 4)])
def test_each_quantized_expert_equals_its_own_solve_on_cuda(gen, spec, sparsity, n, m):
    """The same on a GPU: the batched sweep (the fast backends' batched form) against each
    expert's own solve on the GPU."""
    spec = SPECS[spec]
    W, H = (t.cuda() for t in _experts(gen, 4, 37, 128))
    got = sparsegpt_experts(W, H, sparsity, n, m, blocksize=32, quant=spec)
    for e in range(W.shape[0]):
        want = fp.sparsegpt_layer(W[e], H[e], sparsity, n, m, blocksize=32, quant=spec)
        _check_expert(got[e], want, spec, e)


@pytest.mark.parametrize("spec", ["int4-g32", "int8-channel", "fp8"])
def test_batch_of_one_quantized_is_the_layer(gen, spec):
    """One expert with its own inverse: `sparsegpt_layer(quant=)` bit for bit (torch)."""
    spec = SPECS[spec]
    W, H = _experts(gen, 1, 13, 96)
    inv = fp.inverse_hessian(H[0], 0.01)
    kw = dict(blocksize=32, backend="torch", quant=spec)
    got = sparsegpt_experts(W, H, 0.5, hinvs=[inv], **kw)[0]
    want = fp.sparsegpt_layer(W[0], H[0], 0.5, hinv=inv, **kw)
    for f in ("codes", "scale", "zero", "g_idx"):
        a, b = getattr(got.quant, f), getattr(want.quant, f)
        assert (a is None and b is None) or torch.equal(a.float(), b.float()), f
    assert torch.equal(got.weight, want.weight) and torch.equal(got.mask, want.mask)
    assert got.info["quant"] == want.info["quant"] and got.loss == want.loss


def test_rescaled_expert_scales_its_grid(gen):
    """An expert rescaled exactly (huge weights) keeps its codes; its scales are scaled back."""
    W, H = _experts(gen, 2, 8, 64)
    W[1] *= 2.0**60
    spec = SPECS["int4-g32"]
    got = sparsegpt_experts(W, H, 0.5, blocksize=32, quant=spec)
    want = fp.sparsegpt_layer(W[1], H[1], 0.5, blocksize=32, quant=spec)
    assert "rescaled" in got[1].info
    assert torch.equal(got[1].quant.codes, want.quant.codes)
    torch.testing.assert_close(got[1].quant.scale, want.quant.scale, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------ pipeline


def test_pipeline_quantizes_every_expert_in_batches():
    """Each expert's slice of the fused parameter is its own dequantized codes; the report
    keeps every expert's grids and bytes."""
    model = tiny_moe_model("qwen3_moe")
    report = fp.prune_model(model, calib_ids(8, 32), method="sparsegpt", sparsity=0.5,
                            quant="w4a16", group_size=32, progress=False)  # fmt: skip
    experts = [lr for lr in report.layers if "experts" in lr.name]
    assert len(experts) == 2 * 2 * 4  # blocks x projections x experts
    fused = dict(model.named_parameters())
    for lr in experts:
        assert lr.info["batched"] == 4
        full = f"model.layers.{lr.name}"
        q = report.quantized[full]
        assert q.spec == QuantSpec(4, 32) and lr.info["quant"]["bytes"] == q.nbytes()
        proj, e = full[:-1].split("[")
        assert torch.equal(fused[proj][int(e)], q.dequantize()), full


# ------------------------------------------------------------------------------ checkpoints

ct = pytest.importorskip("compressed_tensors")

SAVED = {
    "qwen3_moe-int4-g32": ("qwen3_moe", dict(quant="w4a16", group_size=32)),
    "mixtral-fp8": ("mixtral", dict(quant="fp8")),  # checkpoint names: block_sparse_moe.w1..
    "olmoe-gptq-int8": ("olmoe", dict(method="gptq", sparsity=0.0, quant="w8a16")),
}


@pytest.mark.parametrize("case", SAVED)
def test_quantized_experts_checkpoint_loads_back_equal(tmp_path, case):
    """Every expert saved as the checkpoint's own linears in the compressed-tensors format:
    transformers loads it (dequantizing) to the model in memory, every weight equal, the
    perplexity within 0.1%; the package's decompressor gives back each expert's rows."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    family, kw = SAVED[case]
    model = tiny_moe_model(family)
    kw = {"method": "sparsegpt", "sparsity": 0.5, **kw}
    report = fp.prune_model(model, calib_ids(8, 32), progress=False, **kw)
    out = save_pruned(model, None, tmp_path / "q", report)
    ids = calib_ids(4, 32, seed=5)
    checked = verify_saved(model, out, report, ids[0])
    assert checked["max_logit_diff"] == 0.0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
    ).eval()
    ppl = [perplexity(m, ids.reshape(-1), 32, progress=False)["ppl"] for m in (model, loaded)]
    assert abs(ppl[1] - ppl[0]) <= 1e-3 * ppl[0]
    tensors = load_file(str(out / "model.safetensors"))
    assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in tensors)  # not fused
    qc = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]
    )
    scheme = qc.config_groups["group_0"]
    comp = BaseCompressor.get_value_from_registry(qc.format)
    experts = [k for k in report.quantized if "experts" in k]
    assert len(experts) == 16
    per_expert = {}  # checkpoint linear -> decompressed weight
    for key in tensors:
        if ".experts." in key and key.endswith("weight_scale"):
            lin = key[: -len(".weight_scale")]
            mine = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(lin + ".")}
            per_expert[lin] = comp.decompress(mine, scheme)["weight"]
    assert len(per_expert) == 2 * 4 * 3  # blocks x experts x (gate, up, down)
    for name in experts:  # each expert's rows, in the checkpoint's split, its own codes
        proj, e = name[:-1].split("[")
        block = proj.split(".")[2]
        parts = sorted(
            (k for k in per_expert if k.split(".")[2] == block and k.split(".")[-2] == e),
            key=lambda k: k.split(".")[-1],
        )
        down = [k for k in parts if k.endswith(("down_proj", "w2"))]
        gate_up = [k for k in parts if k not in down]
        if proj.endswith("down_proj"):
            got = per_expert[down[0]]
        else:  # gate first, then up: as the fused parameter stacks them
            gate_up.sort(key=lambda k: k.endswith(("up_proj", "w3")))
            got = torch.cat([per_expert[k] for k in gate_up])
        assert torch.equal(got, report.quantized[name].dequantize()), name


@pytest.mark.parametrize(
    "family,kw,needle",
    [
        ("gpt_oss", dict(quant="w8a16"), "stored transposed"),
        ("qwen3_moe", dict(quant="w4a16", group_size=32, sym=False), "asymmetric grid on MoE"),
        ("qwen3_moe", dict(quant="w8a16", ignore=["*down_proj*"]), "left dense"),
    ],
)
def test_experts_that_cannot_be_saved_are_refused(tmp_path, family, kw, needle):
    """In memory the prune runs; the save says why it cannot write the experts, and leaves
    the folder marked partial."""
    model = tiny_moe_model(family)
    report = fp.prune_model(model, calib_ids(4, 32), method="sparsegpt", sparsity=0.5,
                            progress=False, **kw)  # fmt: skip
    with pytest.raises(ValueError, match=needle):
        save_pruned(model, None, tmp_path / "q", report)
    assert (tmp_path / "q" / "PARTIAL").exists()


@pytest.mark.parametrize(
    "family,argv,needle",
    [
        ("gpt_oss", ["--quant", "w8a16"], "stored transposed"),
        ("qwen3_moe", ["--quant", "w4a16", "--group-size", "32", "--asym"], "asymmetric grid"),
        ("qwen3_moe", ["--quant", "w8a16", "--ignore", "*experts*"], "left dense"),
    ],
)
def test_cli_refuses_unsavable_experts_before_loading(tmp_path, capsys, family, argv, needle):
    d = tmp_path / "model"
    tiny_moe_model(family).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    out = tmp_path / "out"
    argv = ["prune", "--model", str(d), "--method", "sparsegpt", *argv, "--no-progress"]
    assert main([*argv, "--save", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--save with --quant" in err and needle in err, err
    assert not out.exists()


def test_experts_left_out_of_the_save_of_gpt_oss_stay_fused(tmp_path):
    """gpt-oss's transposed experts, left dense (ignored), are saved fused as they are beside
    the quantized attention, and load back equal."""
    model = tiny_moe_model("gpt_oss")
    report = fp.prune_model(model, calib_ids(4, 32), method="sparsegpt", sparsity=0.5,
                            quant="w8a16", ignore=["*experts*"], progress=False)  # fmt: skip
    assert report.quantized and not any("experts" in k for k in report.quantized)
    out = save_pruned(model, None, tmp_path / "q", report)
    assert verify_saved(model, out, report, calib_ids(1, 32, seed=3)[0])["max_logit_diff"] == 0
