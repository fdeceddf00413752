"""`fastprune prune`: argument errors, and an end-to-end run on a tiny local model directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pipeline_helpers import byte_tokenizer, tiny_model

from fastprune.app.cli import main, parse_pattern
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


# ------------------------------------------------------------------------------ --nproc


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--nproc", "0"], "--nproc must be >= 1, got 0"),
        (["--nproc", "3", "--nsamples", "2"], "--nproc 3 is larger than --nsamples 2"),
        (["--dist-timeout", "0"], "--dist-timeout must be a finite number"),
        (["--dist-timeout", "inf"], "--dist-timeout must be a finite number"),
    ],
)
def test_nproc_flags_checked_before_anything_starts(argv, needle, capsys):
    assert main(["prune", *argv]) == 2
    assert f"fastprune: error: {needle}" in capsys.readouterr().err


def test_nproc_is_an_int(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--nproc", "two"])
    assert "--nproc" in capsys.readouterr().err


def test_nproc_refused_under_torchrun(tmp_path, capsys, monkeypatch):
    d = _tiny_dir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("FASTPRUNE_LAUNCHED", raising=False)
    assert main(["prune", "--model", str(d), "--nproc", "2", "--nsamples", "2"]) == 2
    assert "torchrun" in capsys.readouterr().err


def _saved_weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path)
    _, blocks = find_blocks(m)
    return {
        f"{i}.{k}": get_weight(lin).detach().clone()
        for i, b in enumerate(blocks)
        for k, lin in find_linears(b).items()
    }


def test_nproc_2_matches_one_process(tmp_path, capfd):
    """`--nproc 2` (2 gloo processes started by the CLI) against `--nproc 1`: same masks
    (>= 99.9%, flips only at near-ties), weights to 1e-5 on agreeing rows, same losses;
    only rank 0 prints, evaluates, saves and writes the report."""
    d = _tiny_dir(tmp_path)
    argv = ["prune", "--model", str(d), "--method", "sparsegpt", "--pattern", "2:4"]
    argv += ["--nsamples", "5", "--seqlen", "32", "--eval-windows", "2", "--no-progress"]
    runs = {}
    for nproc in (1, 2):
        out, rep = tmp_path / f"pruned{nproc}", tmp_path / f"report{nproc}.json"
        args = [*argv, "--nproc", str(nproc), "--save", str(out), "--report", str(rep)]
        assert main(args) == 0
        text = capfd.readouterr().out
        runs[nproc] = (json.loads(rep.read_text()), _saved_weights(out), text)
    (one, w1, text1), (two, w2, text2) = runs[1], runs[2]
    for key in ("loading", "perplexity dense", "saved to", "report written to"):
        assert text2.count(key) == 1, key  # rank 0 only
    assert "distributed: 2 ranks (gloo)" in text2 and "distributed" not in text1
    t = two["totals"]
    assert t["world_size"] == 2 and len(t["rank_calibration_seconds"]) == 2
    assert t["communicated_bytes"] > 0 and "world_size" not in one["totals"]
    assert two["nsamples"] == one["nsamples"] == 5
    assert two["ppl_dense"] == one["ppl_dense"]
    assert two["ppl_pruned"] == pytest.approx(one["ppl_pruned"], rel=1e-4)
    for name, Wa in w1.items():
        Wb = w2[name]
        ma, mb = Wa != 0, Wb != 0
        assert (ma == mb).float().mean().item() >= 0.999, name
        rows = (ma == mb).all(dim=1)
        diff = (Wb - Wa)[rows].norm(dim=1)
        assert (diff <= 1e-5 * Wa[rows].norm(dim=1).clamp_min(1e-30)).all(), name
    for la, lb in zip(one["layers"], two["layers"], strict=True):
        assert la["name"] == lb["name"]
        assert lb["loss"] == pytest.approx(
            la["loss"], rel=1e-5 if torch.equal(w1[la["name"]] != 0, w2[lb["name"]] != 0) else 1e-3
        )


def test_workflow_is_the_command_as_a_python_call(tmp_path, capsys):
    """`run_prune(PruneJob(...))` does what `fastprune prune` with the same flags does: the
    same pruned weights (saved) and the same report, returned as well as written."""
    from fastprune.app.workflow import PruneJob, check_prune_job, run_prune

    d = _tiny_dir(tmp_path)
    flags = ["--method", "wanda", "--sparsity", "0.4", "--nsamples", "3", "--seqlen", "16"]
    flags += ["--eval-windows", "2", "--no-progress", "--quiet"]
    assert main(["prune", "--model", str(d), *flags, "--save", str(tmp_path / "a")]) == 0
    job = PruneJob(
        model=str(d), method="wanda", sparsity=0.4, nsamples=3, seqlen=16, eval_windows=2,
        save=str(tmp_path / "b"), report=str(tmp_path / "b.json"), progress=False, quiet=True,
    )  # fmt: skip
    doc = run_prune(job)
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["method"] == "wanda" and doc["ppl_pruned"] > 0
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a Python caller's errors name its arguments, the command's its flags
    with pytest.raises(ValueError, match="^nsamples must be >= 1"):
        check_prune_job(PruneJob(model=str(d), nsamples=0))
    with pytest.raises(ValueError, match="max_swaps must be >= 0"):
        check_prune_job(PruneJob(model=str(d), method="sparseswaps", options={"max_swaps": -1}))
