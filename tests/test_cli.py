"""`fastprune prune`: argument errors, and an end-to-end run on a tiny local model directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pipeline_helpers import byte_tokenizer, tiny_model

from fastprune.cli import main, parse_pattern
from fastprune.models import find_blocks, find_linears, get_weight, resolve_model


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern(None) == (0, 0)
    assert parse_pattern("unstructured") == (0, 0)
    for bad in ("2-4", "4:2", "0:4", "a:b", "2:4:8"):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--method", "obs"], "--method"),
        (["--pattern", "4:2"], "--pattern"),
        (["--model", "no-such-model"], "unknown model"),
        (["--calib", "/no/such/file.txt"], "--calib"),
        (["--eval", "/no/such/file.txt"], "--eval"),
        (["--nsamples", "0"], "--nsamples"),
    ],
)
def test_clear_errors_before_loading(argv, needle, capsys):
    assert main(["prune", *argv]) == 2
    err = capsys.readouterr().err
    assert "fastprune: error:" in err and needle in err


def test_unreadable_calibration_file(tmp_path, capsys):
    d = _tiny_dir(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x81" * 10)
    assert main(["prune", "--model", str(d), "--calib", str(bad), "--no-progress"]) == 2
    assert "UTF-8" in capsys.readouterr().err


def _tiny_dir(tmp_path):
    d = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def test_prune_end_to_end_on_local_directory(tmp_path, capsys):
    d = _tiny_dir(tmp_path)
    out, rep = tmp_path / "pruned", tmp_path / "report.json"
    argv = ["prune", "--model", str(d), "--method", "sparsegpt", "--pattern", "2:4"]
    argv += ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "3", "--no-progress"]
    argv += ["--save", str(out), "--report", str(rep)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "dense" in text and "pruned" in text and "self_attn.q_proj" in text
    doc = json.loads(rep.read_text())
    for key in (
        "model",
        "method",
        "sparsity",
        "pattern",
        "nsamples",
        "seqlen",
        "device",
        "seconds",
        "ppl_dense",
        "ppl_pruned",
        "achieved_sparsity",
        "layers",
    ):
        assert key in doc, key
    assert doc["pattern"] == "2:4" and doc["nsamples"] == 4 and doc["seqlen"] == 32
    assert math.isfinite(doc["ppl_dense"]) and math.isfinite(doc["ppl_pruned"])
    assert doc["ppl_pruned"] != doc["ppl_dense"]
    assert doc["achieved_sparsity"] == 0.5 and len(doc["layers"]) == 14
    assert doc["saved"]["max_logit_diff"] == 0.0
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    _, blocks = find_blocks(m)
    for b in blocks:
        for name, lin in find_linears(b).items():
            W = get_weight(lin)
            assert ((W == 0).reshape(W.shape[0], -1, 4).sum(-1) >= 2).all(), name
    assert resolve_model(str(out)).path == str(out)


def test_backend_option(tmp_path, capsys, monkeypatch):
    d = _tiny_dir(tmp_path)
    rep = tmp_path / "r.json"
    argv = ["prune", "--model", str(d), "--method", "rose", "--nsamples", "2", "--seqlen", "16"]
    argv += ["--eval", "none", "--no-progress", "--report", str(rep)]
    assert main([*argv, "--backend", "torch"]) == 0
    assert {lr["info"]["backend"] for lr in json.loads(rep.read_text())["layers"]} == {"torch"}
    monkeypatch.delenv("FASTPRUNE_CUDA_EMULATE", raising=False)
    capsys.readouterr()
    assert main([*argv, "--backend", "cuda"]) == 2  # CPU tensors: a clear error, not a crash
    assert "CUDA" in capsys.readouterr().err


def test_magnitude_needs_no_calibration_and_eval_none(tmp_path, capsys):
    d = _tiny_dir(tmp_path)
    rep = tmp_path / "r.json"
    argv = ["prune", "--model", str(d), "--method", "magnitude", "--eval", "none"]
    assert main([*argv, "--report", str(rep), "--quiet"]) == 0
    doc = json.loads(rep.read_text())
    assert doc["ppl_dense"] is None and doc["nsamples"] == 0
    assert doc["achieved_sparsity"] == pytest.approx(0.5)
    assert capsys.readouterr().out == ""
    assert torch.isfinite(torch.tensor(doc["seconds"]))
