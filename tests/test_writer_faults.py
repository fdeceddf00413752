"""The checkpoint writer and the save folder under faults: a full disk or an interrupt while
the PARTIAL marker is written, a tokenizer that fails while `finish()` saves it, NaN/inf in a
source tensor, unfinished folders left by earlier runs, and a save folder that is not empty."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import tiny_model, transformers

from fastprune.app import workflow_run
from fastprune.app.workflow_checks import save_folder
from fastprune.streaming import PARTIAL, CheckpointWriter, open_checkpoint
from fastprune.streaming.writer import stale_partials

_write_text = Path.write_text


def fail_marker_writes(monkeypatch, error: BaseException, after: int = 0) -> list[int]:
    """From the `after`-th write of a marker file on, writing it raises `error` halfway (the
    temporary file holds half the text, as a full disk or an interrupt leaves it)."""
    calls = [0]

    def write_text(self, text, *args, **kwargs):
        if PARTIAL in self.name:
            calls[0] += 1
            if calls[0] > after:
                _write_text(self, text[: len(text) // 2], *args, **kwargs)
                raise error
        return _write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    return calls


def test_no_room_for_the_first_marker_leaves_nothing(tmp_path, monkeypatch):
    fail_marker_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="cannot write beside .*No space left"):
        CheckpointWriter(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]
)
def test_a_marker_write_that_fails_keeps_the_last_whole_marker(tmp_path, monkeypatch, error):
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=100) as w:
        w.add("b", torch.ones(40))  # one shard written: the marker lists it
        fail_marker_writes(monkeypatch, error)
        with pytest.raises(type(error)):
            w.add("c", torch.ones(40))  # the next shard's marker write fails halfway
        monkeypatch.undo()
        marker = json.loads((w.tmp_dir / PARTIAL).read_text())  # whole and parseable
        assert marker["status"] == "writing" and marker["tensors_written"] == ["b"]
        assert [p.name for p in w.tmp_dir.iterdir() if "tmp" in p.name] == []
        w.finish(transformers.LlamaConfig())
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out" / PARTIAL).exists()


def test_an_interrupt_while_the_first_marker_is_written_leaves_nothing(tmp_path, monkeypatch):
    fail_marker_writes(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        CheckpointWriter(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


class BrokenTokenizer:
    def save_pretrained(self, folder):
        raise Exception("Failed to write tokenizer.json: No space left on device (os error 28)")


def test_a_failing_tokenizer_is_an_oserror_and_the_marker_says_why(tmp_path):
    w = CheckpointWriter(tmp_path / "out")
    w.add("x", torch.ones(3))
    with pytest.raises(OSError, match="saving the tokenizer failed: Exception: Failed to write"):
        w.finish(transformers.LlamaConfig(), tokenizer=BrokenTokenizer())
    marker = json.loads((w.tmp_dir / PARTIAL).read_text())
    assert marker["status"] == "abandoned"
    assert marker["reason"].startswith("finish() failed: OSError: saving the tokenizer failed")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["lm_head.weight", "model.layers.1.mlp.down_proj.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_source_tensor_is_named_when_loaded(tmp_path, where, bad):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = False
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[where][0, 0] = bad
    model.load_state_dict(sd)
    model.save_pretrained(tmp_path / "src")
    ckpt = open_checkpoint(tmp_path / "src")
    skeleton = ckpt.skeleton()
    with pytest.raises(ValueError, match=rf"checkpoint tensor '{where}' .* 1 NaN/inf"):
        ckpt.load(skeleton, "")


def test_stale_partial_folders_are_named_with_how_to_remove_them(tmp_path):
    out = tmp_path / "pruned"
    assert stale_partials(out) == []
    for _ in range(2):
        with CheckpointWriter(out) as w:
            w.add("x", torch.ones(2))  # closed without finish(): left beside `out`
    (tmp_path / ".other.partial-1-x").mkdir()  # another output's: not named
    stale = stale_partials(out)
    assert len(stale) == 2 and all(p.name.startswith(".pruned.partial-") for p in stale)
    said = []
    workflow_run._mention_stale_partials(str(out), said.append)
    assert len(said) == 1 and "2 unfinished folder(s)" in said[0] and "rm -r" in said[0]
    assert all(str(p) in said[0] for p in stale)
    assert all(p.is_dir() for p in stale)  # never removed without being asked


def test_a_non_empty_save_folder_is_refused_on_every_path(tmp_path):
    assert save_folder(str(tmp_path / "new"), "--save") == str(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    assert save_folder(str(tmp_path / "empty"), "--save")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--save .*busy.* not empty"):
        save_folder(str(tmp_path / "busy"), "--save")
