"""Streaming I/O: opening and checking a sharded safetensors checkpoint, the meta-parameter
skeleton, loading / releasing one block at a time, and the sharded writer with its partial
marker, on tiny random models saved by transformers' own `save_pretrained`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pipeline_helpers import (
    byte_tokenizer,
    calib_ids,
    tiny_config,
    tiny_model,
    tiny_moe_model,
    transformers,
)

from fastprune.models import find_blocks
from fastprune.streaming import (
    PARTIAL,
    CheckpointWriter,
    available_host_memory,
    check_output,
    open_checkpoint,
    verify_streamed,
)
from fastprune.streaming import loader as loader_mod

FAMILIES = ("llama", "qwen2", "qwen3_moe", "mixtral", "gpt_oss")
SHARD = "50KB"  # the tiny models are ~430 KB in float32: 8 to 13 shards


def make_model(family: str, seed: int = 0):
    if family in ("llama", "qwen2"):
        return tiny_model(family, seed=seed)
    return tiny_moe_model(family, seed=seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (in-memory model, folder it was saved to with save_pretrained)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = make_model(family)
            folder = tmp_path_factory.mktemp(family)
            model.save_pretrained(folder, max_shard_size=SHARD)
            cache[family] = (model, folder)
        return cache[family]

    return get


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def load_blockwise(ckpt, model):
    """What the streaming pipeline does: everything outside the blocks, then block by block."""
    path, blocks = find_blocks(model)
    ckpt.load(model, "", skip=[path])
    for i, block in enumerate(blocks):
        ckpt.load(block, f"{path}.{i}")
    return path, blocks


# ------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("family", FAMILIES)
def test_open_reads_headers(saved, family):
    model, folder = saved(family)
    ckpt = open_checkpoint(folder)
    assert len(ckpt.shards) >= 3
    assert ckpt.nbytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert ckpt.stored_dtype() == torch.float32
    assert available_host_memory() > 0
    assert ckpt.fits_in_memory()


@pytest.mark.parametrize("family", FAMILIES)
def test_skeleton_meta_params_real_buffers(saved, family):
    model, folder = saved(family)
    skel = open_checkpoint(folder).skeleton()
    assert all(p.device.type == "meta" for p in skel.parameters())
    mine = dict(model.named_buffers())
    for name, b in skel.named_buffers():
        assert b.device.type == "cpu", name
        assert torch.equal(b, mine[name]), name
    assert not skel.training


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_load_gives_identical_logits(saved, family):
    model, folder = saved(family)
    ckpt = open_checkpoint(folder)
    skel = ckpt.skeleton()
    path, blocks = load_blockwise(ckpt, skel)
    assert ckpt.meta_names(skel) == []
    for name, p in skel.named_parameters():
        assert not p.requires_grad and isinstance(p, torch.nn.Parameter), name
    ids = calib_ids(2, 16)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        got = skel(input_ids=ids, use_cache=False).logits
    assert torch.equal(ref, got)
    for i, block in enumerate(blocks):
        ckpt.release(block)
        released = tuple(f"{path}.{j}." for j in range(i + 1))
        assert ckpt.meta_names(skel) == [
            n for n, _ in skel.named_parameters(remove_duplicate=False) if n.startswith(released)
        ]


def test_load_one_block_reads_only_its_tensors(saved, monkeypatch):
    _, folder = saved("qwen3_moe")
    ckpt = open_checkpoint(folder)
    skel = ckpt.skeleton()
    path, blocks = find_blocks(skel)
    opened, read = [], []
    real = loader_mod.open_safetensors

    class Recorder:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    def recording(p):
        opened.append(Path(p).name)
        return Recorder(real(p))

    monkeypatch.setattr(loader_mod, "open_safetensors", recording)
    nbytes = ckpt.load(blocks[1], f"{path}.1", dtype=torch.bfloat16)
    mine = {k for k in ckpt.tensors if k.startswith(f"{path}.1.")}
    assert sorted(read) == sorted(mine)
    assert len(opened) == len(set(opened)) == len({ckpt.tensors[k].shard for k in mine})
    assert nbytes == sum(ckpt.tensors[k].nbytes for k in mine)
    loaded = {n for n, p in skel.named_parameters() if p.device.type != "meta"}
    assert loaded == {n for n, _ in skel.named_parameters() if n.startswith(f"{path}.1.")}
    assert {p.dtype for p in blocks[1].parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="prefix='model.layers.0'.*not the name"):
        ckpt.load(blocks[1], f"{path}.0")


def test_tied_embeddings_stay_tied(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "src", max_shard_size=SHARD)
    ckpt = open_checkpoint(tmp_path / "src")
    assert "lm_head.weight" not in ckpt.tensors
    skel = ckpt.skeleton()
    assert skel.lm_head.weight is skel.model.embed_tokens.weight
    ckpt.load(skel.model.embed_tokens, "model.embed_tokens")
    assert skel.lm_head.weight is skel.model.embed_tokens.weight
    assert skel.lm_head.weight.device.type == "cpu"
    ckpt.load(skel.lm_head, "lm_head")
    assert skel.lm_head.weight is skel.model.embed_tokens.weight
    load_blockwise(ckpt, skel)
    ids = calib_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, skel(input_ids=ids).logits)
    ckpt.release(skel.model.embed_tokens)
    assert skel.lm_head.weight is skel.model.embed_tokens.weight
    assert skel.lm_head.weight.device.type == "meta"


# ------------------------------------------------------------------------------ writing


def write_blockwise(ckpt, skel, out: Path, max_shard_bytes: int, source_layout: bool = True):
    """Load, write and release one block at a time, in the source checkpoint's names."""
    path, blocks = find_blocks(skel)
    with CheckpointWriter(out, max_shard_bytes=max_shard_bytes, source_dir=ckpt.path) as w:
        pieces = [(f"{path}.{i}", b) for i, b in enumerate(blocks)]
        ckpt.load(skel, "", skip=[path])
        for prefix, block in [("", None), *pieces]:
            if block is not None:
                ckpt.load(block, prefix)
            state = (block if block is not None else skel).state_dict(
                prefix=f"{prefix}." if prefix else ""
            )
            for name, t in state.items():
                if block is None and name.startswith(f"{path}."):
                    continue
                if name in ckpt.tensors or not source_layout:
                    w.add(name, t)
                elif name != "lm_head.weight" or "lm_head.weight" in ckpt.tensors:
                    for key, part in ckpt.source_tensors(name, t):
                        w.add(key, part)
            if block is not None:
                ckpt.release(block)
                assert all(p.device.type == "meta" for p in block.parameters())
        w.finish(skel.config, extra_files={"note.txt": "streamed"})
    return w


@pytest.mark.parametrize("family", FAMILIES)
def test_writer_round_trip(saved, family, tmp_path):
    model, folder = saved(family)
    ckpt = open_checkpoint(folder)
    skel = ckpt.skeleton()
    out = tmp_path / "pruned"
    w = write_blockwise(ckpt, skel, out, max_shard_bytes=64_000)
    assert not list(tmp_path.glob(".pruned.partial-*"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert set(index["weight_map"]) == set(ckpt.tensors)  # the source's own layout
    assert index["metadata"]["total_size"] == ckpt.nbytes
    assert (out / "note.txt").read_text() == "streamed"
    assert not (out / PARTIAL).exists()
    summary = verify_streamed(out, w.digests)
    assert summary["verified"] == len(ckpt.tensors)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    theirs = reloaded.state_dict()
    assert theirs.keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():
        assert torch.equal(t, theirs[name]), name


def test_writer_model_names_reload(saved, tmp_path):
    """Fused expert tensors written under the model's own names reload as well."""
    model, _ = saved("qwen3_moe")
    out = tmp_path / "fused"
    with CheckpointWriter(out, max_shard_bytes=10**9) as w:
        for name, t in model.state_dict().items():
            w.add(name, t)
        w.finish(model.config, byte_tokenizer(), transformers.GenerationConfig(max_new_tokens=3))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert "model.safetensors.index.json" not in names
    assert transformers.AutoTokenizer.from_pretrained(out)("ab")["input_ids"] == [64, 65]
    assert "model.layers.0.mlp.experts.gate_up_proj" in open_checkpoint(out).tensors
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, theirs[name]), name


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_writer_interrupted_leaves_marked_partial(tmp_path, error):
    out = tmp_path / "out"
    with pytest.raises(error), CheckpointWriter(out, max_shard_bytes=1000) as w:
        for i in range(5):
            w.add(f"t{i}", torch.full((100,), float(i)))
        raise error("stopped at block 3")
    assert not out.exists()
    (tmp, *others) = list(tmp_path.glob(".out.partial-*"))
    assert others == []
    marker = json.loads((tmp / PARTIAL).read_text())
    assert marker["partial"] is True and marker["status"] == "abandoned"
    assert "stopped at block 3" in marker["reason"]
    assert marker["tensors_written"] == [f"t{i}" for i in range(4)]
    assert sorted(p.name for p in tmp.iterdir()) == sorted([PARTIAL, *marker["shards_written"]])


def test_writer_without_finish_is_partial(tmp_path):
    with CheckpointWriter(tmp_path / "out") as w:
        w.add("x", torch.ones(3))
    assert not (tmp_path / "out").exists()
    marker = json.loads((w.tmp_dir / PARTIAL).read_text())
    assert "finish" in marker["reason"]
    w.discard()
    assert not w.tmp_dir.exists()


def test_writer_refuses_bad_output(saved, tmp_path):
    _, folder = saved("llama")
    with pytest.raises(ValueError, match="source checkpoint"):
        CheckpointWriter(folder, source_dir=folder)
    with pytest.raises(ValueError, match="source checkpoint"):
        check_output(folder / "sub" / "out", folder)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        CheckpointWriter(tmp_path / "busy")
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no temporary folder made
    with CheckpointWriter(tmp_path / "w") as w:
        w.add("x", torch.ones(2))
        with pytest.raises(ValueError, match="'x'.*already added"):
            w.add("x", torch.ones(2))
        with pytest.raises(ValueError, match="meta device"):
            w.add("y", torch.empty(2, device="meta"))
        w.finish(transformers.LlamaConfig())
    with pytest.raises(ValueError, match="not empty"):
        CheckpointWriter(tmp_path / "w")


# ------------------------------------------------------------------------------ bad inputs


def rewrite_shard(folder: Path, key: str, fn) -> None:
    """Replace tensor `key` in its shard by `fn(tensor)` (the shard is rewritten whole)."""
    from safetensors.torch import load_file, save_file

    shard = open_checkpoint(folder).tensors[key].shard
    tensors = load_file(folder / shard)
    tensors[key] = fn(tensors[key])
    save_file(tensors, folder / shard, metadata={"format": "pt"})


def ckpt_index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def edit_index(folder: Path, fn) -> None:
    f = folder / "model.safetensors.index.json"
    f.write_text(json.dumps(fn(json.loads(f.read_text()))))


KEY = "model.layers.1.self_attn.k_proj.weight"


def test_refuses_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(ValueError, match="nope.*not a folder"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse .*config.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        open_checkpoint(tmp_path)


def test_refuses_broken_index(saved, tmp_path):
    folder = copy_of(saved("llama")[1], tmp_path)
    index = folder / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text(good[:-10])
    with pytest.raises(ValueError, match="cannot parse .*model.safetensors.index.json"):
        open_checkpoint(folder)
    index.write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(ValueError, match="index.json has no 'weight_map'"):
        open_checkpoint(folder)
    index.write_text(good)
    edit_index(folder, lambda d: {**d, "weight_map": {**d["weight_map"], KEY: "../x"}})
    with pytest.raises(ValueError, match=f"tensor '{KEY}' to '../x', not a plain file name"):
        open_checkpoint(folder)


def test_refuses_missing_shard(saved, tmp_path):
    folder = copy_of(saved("llama")[1], tmp_path)
    shard = open_checkpoint(folder).tensors[KEY].shard
    (folder / shard).unlink()
    with pytest.raises(ValueError, match=f"shard '{shard}' .* is missing"):
        open_checkpoint(folder)


def test_refuses_tensor_missing_from_its_shard(saved, tmp_path):
    folder = copy_of(saved("llama")[1], tmp_path)
    tensors = open_checkpoint(folder).tensors
    other = next(t.shard for t in tensors.values() if t.shard != tensors[KEY].shard)
    edit_index(folder, lambda d: {**d, "weight_map": {**d["weight_map"], KEY: other}})
    with pytest.raises(ValueError, match=f"tensor '{KEY}' in shard '{other}', whose header"):
        open_checkpoint(folder)


def test_refuses_unreadable_shard_header(saved, tmp_path):
    folder = copy_of(saved("llama")[1], tmp_path)
    shard = open_checkpoint(folder).tensors[KEY].shard
    (folder / shard).write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=f"cannot read the safetensors header of .*{shard}"):
        open_checkpoint(folder)


def test_refuses_wrong_shape(saved, tmp_path):
    folder = copy_of(saved("llama")[1], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    ckpt = open_checkpoint(folder)
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight' expects shape \[96, 64\]; "
                       r"checkpoint tensor .* has shape \[128, 64\]"):  # fmt: skip
        ckpt.skeleton()


def test_refuses_wrong_expert_shape(saved, tmp_path):
    folder = copy_of(saved("qwen3_moe")[1], tmp_path)
    key = "model.layers.0.mlp.experts.2.up_proj.weight"
    rewrite_shard(folder, key, lambda t: t[:-1])
    with pytest.raises(ValueError, match="experts.gate_up_proj' expects shape .* per-expert"):
        open_checkpoint(folder).skeleton()


def test_refuses_non_float_dtype(saved, tmp_path):
    folder = copy_of(saved("llama")[1], tmp_path)
    rewrite_shard(folder, KEY, lambda t: t.to(torch.int8))
    with pytest.raises(ValueError, match=f"'{KEY}' has dtype I8.*expects a floating dtype"):
        open_checkpoint(folder).skeleton()


def test_refuses_unsupported_names(saved, tmp_path):
    """Names needing a conversion the reader does not know are refused with an example."""
    folder = copy_of(saved("llama")[1], tmp_path)
    new = KEY.replace("k_proj", "key")
    from safetensors.torch import load_file, save_file

    shard = open_checkpoint(folder).tensors[KEY].shard
    tensors = load_file(folder / shard)
    tensors[new] = tensors.pop(KEY)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    renamed = {(new if k == KEY else k): v for k, v in ckpt_index(folder)["weight_map"].items()}
    edit_index(folder, lambda d: {**d, "weight_map": renamed})
    with pytest.raises(ValueError, match=f"no tensor for .* '{KEY}'.*has '{new}'.*conversion"):
        open_checkpoint(folder).skeleton()
    ckpt = open_checkpoint(folder)
    edit_index(folder, lambda d: {**d, "weight_map": {**d["weight_map"], KEY: shard}})
    tensors[KEY] = tensors[new].clone()
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    ckpt = open_checkpoint(folder)
    with pytest.raises(ValueError, match=f"tensor '{new}' .* maps to no parameter"):
        ckpt.skeleton()


def test_make_random_checkpoint_script(tmp_path, capsys):
    from benchmarks.make_random_checkpoint import main

    out = tmp_path / "random"
    main([str(out), "--blocks", "2", "--hidden", "64", "--heads", "4", "--vocab", "300",
          "--shard-mb", "0.05", "--verify"])  # fmt: skip
    assert "verified" in capsys.readouterr().out
    ckpt = open_checkpoint(out)
    assert len(ckpt.shards) >= 3 and ckpt.stored_dtype() == torch.bfloat16
    skel = ckpt.skeleton()
    load_blockwise(ckpt, skel)
    with torch.no_grad():
        assert torch.isfinite(skel(input_ids=calib_ids(1, 8)).logits).all()
