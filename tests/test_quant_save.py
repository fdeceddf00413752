"""Quantized prunes end to end: the quant options and their errors, the report of the grid and
its bytes, compressed-tensors checkpoints loaded back by transformers (with the
compressed-tensors package) equal to fastprune's in-memory dequantized model, their size, the
command line, and the quant options refused before loading."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from pipeline_helpers import VOCAB, byte_tokenizer, calib_ids, tiny_model

import fastprune as fp
from fastprune.app.cli import main
from fastprune.app.saving import save_pruned, verify_saved
from fastprune.config import PruneConfig, check_config, flag_of
from fastprune.evaluate import perplexity
from fastprune.quant import QuantSpec, grid_error, round_to_nearest
from fastprune.result import PruneResult
from fastprune.solvers.registry import METHODS, Method, register, unregister

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")

RTN = "rtn_test"  # a method registered here: magnitude mask, kept weights rounded (RTN)


def _rtn_solver(W, H, sparsity, prune_n, prune_m, quant=None):
    W = W.float()
    mask = torch.ones_like(W, dtype=torch.bool)
    k = int(W.numel() * sparsity)
    if k:
        mask = W.abs() > W.abs().flatten().kthvalue(k).values
    kept = W * mask
    q = round_to_nearest(kept, quant or "w4a16")
    deq = q.dequantize()
    info = {"method": RTN, "quant": {**q.spec.as_info(), "grid_error": grid_error(kept, deq, mask)}}
    return PruneResult(deq, mask, None, info, quant=q)


@pytest.fixture
def rtn():
    register(
        Method(RTN, _rtn_solver, "test: magnitude + RTN", needs_hessian=False, takes_quant=True)
    )
    yield RTN
    unregister(RTN)


def wide_llama(seed: int = 0):
    """A tiny llama whose layers take 128 or 256 inputs (whole groups of 128)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=128, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.2,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(cfg).float().eval()


def _load(path, dequantize: bool = False):
    kw = {}
    if dequantize:
        kw["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


def _ppl(model, ids):
    return perplexity(model, ids, 32, progress=False)["ppl"]


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(quant="w4a16", bits=9), "bits must be in [2, 8]"),
        (dict(quant="w4a16", bits=1), "bits must be in [2, 8]"),
        (dict(quant="w4a16", group_size=0), "group_size"),
        (dict(quant="w4a16", group_size=2.5), "group_size"),
        (dict(quant="w5a16"), "quant must be one of"),
        (dict(bits=4), "give quant"),
        (dict(sym=False), "give quant"),
        (dict(actorder=True), "give quant"),
        (dict(quant="fp8", bits=4), "bits=4 does not apply to quant='fp8'"),
        (dict(quant="fp8", group_size=32), "group_size=32 does not apply"),
        (dict(quant="fp8", sym=False), "sym=False"),
    ],
)
def test_bad_quant_options_name_the_argument(rtn, kw, needle):
    with pytest.raises(
        (ValueError, TypeError), match=needle.replace("[", r"\[").replace("]", r"\]")
    ):
        check_config(PruneConfig(method=rtn, **kw))


def test_quant_with_a_method_that_does_not_quantize_names_both():
    with pytest.raises(ValueError, match="quant='w4a16' does not apply to method 'wanda'"):
        check_config(PruneConfig(method="wanda", quant="w4a16"))


def test_fp8_without_float8_is_refused(rtn, monkeypatch):
    import fastprune.quant as quant

    monkeypatch.setattr(quant, "has_fp8", lambda: False)
    with pytest.raises(ValueError, match="quant fp8 needs torch.float8_e4m3fn"):
        check_config(PruneConfig(method=rtn, quant="fp8"))


def test_the_options_make_the_grid(rtn):
    def spec(**kw):
        return check_config(PruneConfig(method=rtn, **kw)).quant

    assert spec() is None
    assert spec(quant="w4a16") == QuantSpec.preset("w4a16")
    assert spec(quant="w8a16", bits=4, sym=False) == QuantSpec(4, None, sym=False)
    assert spec(quant="w4a16", group_size=64, actorder=True) == QuantSpec(4, 64, actorder=True)
    given = QuantSpec(3, 32, sym=False)
    assert spec(quant=given) is given
    assert flag_of("group_size") == "--group-size" and flag_of("sym") == "--sym"


# ------------------------------------------------------------------------------ report


def test_report_gives_the_grid_its_error_and_bytes(rtn):
    model = tiny_model("llama")
    report = fp.prune_model(model, method=rtn, sparsity=0.5, quant="w4a16", group_size=32,
                            progress=False)  # fmt: skip
    assert len(report.quantized) == len(report.layers) == 14
    for lr in report.layers:
        q = lr.info["quant"]
        assert (q["bits"], q["group_size"], q["format"], q["sym"]) == (4, 32, "int", True)
        assert 0 < q["grid_error"] < 0.1
        qw = report.quantized[f"model.layers.{lr.name}"]
        assert q["bytes"] == qw.nbytes() and qw.codes.device.type == "cpu"
        rows, cols = lr.shape
        # int4: 8 codes a 4-byte word, one float32 scale per group of 32
        assert q["bytes"] == rows * cols // 2 + rows * (cols // 32) * 4
    t = report.totals["quant"]
    assert t["layers"] == 14 and t["bytes"] == sum(
        lr.info["quant"]["bytes"] for lr in report.layers
    )
    assert t["bf16_bytes"] == 2 * report.totals["params"]
    assert report.options["quant"]["bits"] == 4
    assert "quant: int4 groups of 32 on 14 layers" in report.summary()
    doc = report.to_dict()
    assert "quantized" not in doc
    json.dumps(doc)  # nothing but JSON


# ------------------------------------------------------------------------------ checkpoints


CASES = {
    "int4-g128-sym": dict(quant="w4a16"),
    "int8-channel": dict(quant="w8a16"),
    "int4-g32-asym": dict(quant="w4a16", group_size=32, sym=False),
    "int3-channel-asym": dict(quant="w8a16", bits=3, sym=False),
    "fp8": dict(quant="fp8"),
}


@pytest.mark.parametrize("case", CASES)
def test_saved_checkpoint_loads_back_equal(rtn, tmp_path, case):
    """transformers (with compressed-tensors) loads the checkpoint on CPU and its logits and
    perplexity equal fastprune's in-memory dequantized model."""
    model = wide_llama()
    report = fp.prune_model(model, method=rtn, sparsity=0.5, progress=False, **CASES[case])
    out = save_pruned(model, byte_tokenizer(), tmp_path / "q", report)
    assert not (out / "PARTIAL").exists()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    spec = next(iter(report.quantized.values())).spec
    fmt = "float-quantized" if spec.fp8 else "pack-quantized"
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    (group,) = qc["config_groups"].values()
    w = group["weights"]
    assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    assert (w["num_bits"], w["symmetric"], w["type"]) == (
        spec.bits if not spec.fp8 else 8,
        spec.sym,
        "float" if spec.fp8 else "int",
    )
    assert w["group_size"] == spec.group_size
    assert w["strategy"] == ("channel" if spec.group_size is None else "group")
    sparsity = qc["sparsity_config"]
    assert sparsity["global_sparsity"] == report.achieved_sparsity == 0.5
    assert sparsity["sparsity_structure"] == "unstructured" and sparsity["format"] == "dense"
    # the package's default load leaves an asymmetric grid's packed zero points unloadable (it
    # expects them unpacked, then unpacks them); its dequantize-on-load path reads them
    loaded = _load(out, dequantize=not spec.sym)
    ids = calib_ids(4, 32, seed=5).reshape(-1)
    x = ids[:32].reshape(1, -1)
    with torch.no_grad():
        ref, got = model(input_ids=x).logits, loaded(input_ids=x).logits
    assert torch.allclose(ref, got, rtol=0, atol=1e-5 * ref.abs().max().item())
    ppl_ref, ppl_got = _ppl(model, ids), _ppl(loaded, ids)
    assert math.isfinite(ppl_ref) and abs(ppl_got - ppl_ref) <= 1e-3 * ppl_ref
    checked = verify_saved(model, out, report, x[0])
    assert checked["sparsity"] >= 0.5 and checked["max_logit_diff"] <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_saved_as_it_is_in_memory(rtn, tmp_path, dtype):
    """Scales stored in the model's dtype: the layers in memory are what a runtime computes
    from them, so the reloaded model equals it bit for bit."""
    wide_llama().save_pretrained(tmp_path / "src")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=dtype)
    report = fp.prune_model(model, method=rtn, sparsity=0.5, quant="w4a16", progress=False)
    out = save_pruned(model, None, tmp_path / "q", report)
    x = calib_ids(1, 32, seed=2)[0]
    checked = verify_saved(model, out, report, x)  # every weight equal, logits within 1e-5
    assert checked["max_logit_diff"] == 0.0
    scale = next(t for k, t in _tensors(out).items() if k.endswith("weight_scale"))
    assert scale.dtype == dtype


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_saved_tensors_are_the_codes(rtn, tmp_path):
    """The tensors written: packed codes, scales, zero points, shape; the package's own
    decompressor gives back fastprune's dequantized weights."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    model = wide_llama()
    report = fp.prune_model(model, method=rtn, sparsity=0.5, quant="w4a16", group_size=64,
                            sym=False, progress=False)  # fmt: skip
    out = save_pruned(model, None, tmp_path / "q", report)
    tensors = load_file(str(out / "model.safetensors"))
    qc = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]
    )
    scheme = qc.config_groups["group_0"]
    comp = BaseCompressor.get_value_from_registry(qc.format)
    for name, q in report.quantized.items():
        mine = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(name + ".")}
        assert set(mine) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
        rows, cols = q.codes.shape
        assert mine["weight_packed"].dtype == torch.int32
        assert mine["weight_packed"].shape == (rows, cols * 4 // 32)
        assert mine["weight_shape"].tolist() == [rows, cols]
        assert torch.equal(mine["weight_scale"], q.scale)
        W = comp.decompress(mine, scheme)["weight"]
        assert torch.equal(W, q.dequantize()), name


def test_w4a16_checkpoint_size(rtn, tmp_path):
    """W4A16 g128: the decoder blocks' tensors take at most 0.3x their bf16 bytes."""
    from safetensors.torch import load_file

    model = wide_llama()
    report = fp.prune_model(model, method=rtn, sparsity=0.5, quant="w4a16", progress=False)
    out = save_pruned(model, None, tmp_path / "q", report)
    saved = dense = 0
    for key, t in load_file(str(out / "model.safetensors")).items():
        if key.startswith("model.layers."):
            saved += t.numel() * t.element_size()
    for key, p in model.state_dict().items():
        if key.startswith("model.layers."):
            dense += 2 * p.numel()
    assert saved <= 0.3 * dense
    assert report.totals["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size


def test_failed_save_leaves_the_folder_marked_partial(rtn, tmp_path):
    model = tiny_model("llama")  # 64 inputs: not whole groups of 48
    report = fp.prune_model(model, method=rtn, sparsity=0.5, quant="w4a16", group_size=48,
                            progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="not a whole number of groups of 48"):
        save_pruned(model, None, tmp_path / "q", report)
    marker = json.loads((tmp_path / "q" / "PARTIAL").read_text())
    assert marker["status"] == "abandoned" and "groups of 48" in marker["reason"]


def test_actorder_groups_that_are_not_contiguous_are_refused(tmp_path):
    from fastprune.app.quantized_checkpoint import check_layout

    q = round_to_nearest(torch.randn(8, 64), QuantSpec(4, 32, actorder=True))
    check_layout(q, "layer")  # contiguous groups: saved
    q.g_idx = torch.arange(64, dtype=torch.int32).flip(0) // 32
    with pytest.raises(ValueError, match="act-order groups are not contiguous"):
        check_layout(q, "layer")


# ------------------------------------------------------------------------------ command line


def _model_dir(tmp_path, model):
    d = tmp_path / "model"
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize(
    "argv,needle",
    [
        (
            ["--method", "wanda", "--quant", "w4a16"],
            "--quant w4a16 does not apply to method 'wanda'",
        ),
        (["--quant", "w4a16", "--bits", "9"], "--bits must be in [2, 8]"),
        (["--quant", "w4a16", "--group-size", "0"], "--group-size"),
        (["--bits", "4"], "give --quant"),
        (["--quant", "fp8", "--asym"], "--asym: an asymmetric grid does not apply"),
        (["--quant", "fp8", "--bits", "4"], "--bits 4 does not apply to --quant fp8"),
        (["--quant", "w4a16", "--group-size", "48", "--save", "OUT"], "--group-size 48"),
        (["--quant", "w4a16", "--actorder", "--save", "OUT"], "--actorder with groups"),
    ],
)
def test_bad_quant_flags_are_refused_before_loading(rtn, tmp_path, capsys, argv, needle):
    d = _model_dir(tmp_path, tiny_model("llama"))
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    if "--method" not in argv:
        argv = ["--method", rtn, *argv]
    assert main(["prune", "--model", str(d), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert "fastprune: error:" in err and needle in err, err
    assert not (tmp_path / "out").exists()


def test_save_without_the_package_is_refused_before_loading(rtn, tmp_path, capsys, monkeypatch):
    import fastprune.app.quantized_checkpoint as qc

    monkeypatch.setattr(qc, "missing_package", lambda: "needs the compressed-tensors package")
    d = _model_dir(tmp_path, wide_llama())
    argv = ["prune", "--model", str(d), "--method", rtn, "--quant", "w4a16", "--no-progress"]
    assert main([*argv, "--save", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--save with --quant: needs the compressed-tensors package" in err
    assert not (tmp_path / "out").exists()


def _cli_quantized(tmp_path, method: str, *extra: str) -> dict:
    d = _model_dir(tmp_path, wide_llama())
    out, rep = tmp_path / "out", tmp_path / "report.json"
    argv = ["prune", "--model", str(d), "--method", method, *extra, "--quant", "w4a16"]
    argv += ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--no-progress"]
    argv += ["--save", str(out), "--report", str(rep)]
    assert main(argv) == 0
    doc = json.loads(rep.read_text())
    assert doc["quant"]["bits"] == 4 and doc["quant"]["group_size"] == 128
    assert doc["saved"]["bytes"] == (out / "model.safetensors").stat().st_size
    assert all(lr["info"]["quant"]["bytes"] > 0 for lr in doc["layers"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    loaded = _load(out)
    ids = calib_ids(2, 32, seed=3)
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=ids).logits).all()
    return doc


def test_cli_quantizes_and_saves(rtn, tmp_path, capsys):
    doc = _cli_quantized(tmp_path, rtn)
    assert doc["achieved_sparsity"] == 0.5
    assert "compressed-tensors pack-quantized" in capsys.readouterr().out


needs_quant_solvers = pytest.mark.skipif(
    not getattr(METHODS.get("sparsegpt"), "takes_quant", False) or "gptq" not in METHODS,
    reason="the OBS solvers take quant= once fastprune's gptq method is registered",
)


@needs_quant_solvers
def test_cli_sparsegpt_w4a16(tmp_path):
    doc = _cli_quantized(tmp_path, "sparsegpt")
    assert abs(doc["achieved_sparsity"] - 0.5) < 1e-3  # SparseGPT's per-block threshold


OBS_CASES = {
    "sparsegpt-w4a16": dict(method="sparsegpt", sparsity=0.5, quant="w4a16"),
    "gptq-w4a16": dict(method="gptq", sparsity=0.0, quant="w4a16"),
    "sparsegpt-2:4-w8a16-actorder": dict(
        method="sparsegpt", prune_n=2, prune_m=4, quant="w8a16", actorder=True
    ),
    "gptq-int4-g64-asym": dict(
        method="gptq", sparsity=0.0, quant="w4a16", group_size=64, sym=False
    ),  # fmt: skip
    "rose-fp8": dict(method="rose", sparsity=0.5, quant="fp8"),
}


@needs_quant_solvers
@pytest.mark.parametrize("case", OBS_CASES)
def test_obs_quantized_checkpoint_equals_the_model(tmp_path, case):
    """The OBS solvers' quantized layers (GPTQ's sweep) saved and loaded back: perplexity
    equal to the in-memory model's within 0.1%, every layer's weights equal."""
    kw = OBS_CASES[case]
    model = wide_llama()
    report = fp.prune_model(model, calib_ids(8, 32), progress=False, **kw)
    assert len(report.quantized) == 14
    assert all(lr.info["quant"]["grid_error"] > 0 for lr in report.layers)
    out = save_pruned(model, None, tmp_path / "q", report)
    spec = next(iter(report.quantized.values())).spec
    loaded = _load(out, dequantize=not spec.sym)
    ids = calib_ids(4, 32, seed=5).reshape(-1)
    ppl_ref, ppl_got = _ppl(model, ids), _ppl(loaded, ids)
    assert abs(ppl_got - ppl_ref) <= 1e-3 * ppl_ref
    for name in report.quantized:  # decompressed by the first forward
        got = loaded.get_submodule(name).weight
        assert torch.equal(got, model.get_submodule(name).weight), name
