"""Streamed pruning (`prune_checkpoint`): the same pruned weights as the in-memory
`prune_model`, bit for bit, on tiny random checkpoints saved in several shards; a normal
Hugging Face checkpoint out; what cannot be streamed refused before any work; an interrupted
run leaves its partial folder marked and the source untouched."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from pipeline_helpers import (
    VOCAB,
    byte_tokenizer,
    calib_ids,
    tiny_model,
    tiny_moe_model,
    transformers,
)
from torch import nn

import fastprune as fp
from fastprune.pipeline import stream as stream_mod
from fastprune.pipeline.stages import PruneRun
from fastprune.pipeline.stream import prune_checkpoint, verify_streamed_prune
from fastprune.streaming import PARTIAL
from fastprune.streaming.loader import BlockLoader

SHARD = "60KB"  # the tiny models are a few hundred KB in float32: 3 or more shards

CASES = [
    ("llama", "sparsegpt", {"prune_n": 2, "prune_m": 4}),
    ("llama", "wanda", {"sparsity": 0.5}),
    ("qwen2", "rose", {"sparsity": 0.6}),
    ("qwen3_moe", "sparsegpt", {"sparsity": 0.5}),
    ("mixtral", "fastprune", {"prune_n": 2, "prune_m": 4}),
]


def _model(family: str):
    return tiny_model(family) if family in ("llama", "qwen2") else tiny_moe_model(family)


def _saved(family: str, tmp_path):
    folder = tmp_path / f"{family}-src"
    _model(family).save_pretrained(folder, max_shard_size=SHARD)
    return folder


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _files_digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(("family", "method", "kw"), CASES)
def test_streamed_equals_in_memory(tmp_path, family, method, kw):
    src = _saved(family, tmp_path)
    assert len(list(src.glob("*.safetensors"))) >= 3
    before = _files_digest(src)
    model = _load(src)
    calib = calib_ids(n=4, seqlen=16)
    ref = fp.prune_model(model, calib, method=method, progress=False, **kw)
    out = tmp_path / "pruned"
    rep = prune_checkpoint(src, out, calib, method=method, progress=False, **kw)
    assert _files_digest(src) == before  # the source is only read
    assert rep.totals["path"] == "streamed" and ref.totals["path"] == "in memory"
    assert rep.totals["peak_host_memory_bytes"] > 0 and rep.totals["bytes_read"] > 0
    # the same masks and losses, layer by layer
    assert [lr.name for lr in rep.layers] == [lr.name for lr in ref.layers]
    for a, b in zip(rep.layers, ref.layers):
        assert a.sparsity == b.sparsity and a.loss == b.loss, a.name
    assert rep.block_sparsity == ref.block_sparsity
    # a normal checkpoint out: index, config, report; weights bit for bit the in-memory ones
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    saved_report = json.loads((out / "fastprune_report.json").read_text())
    assert saved_report["method"] == ref.method
    got = _load(out).state_dict()
    want = model.state_dict()
    assert got.keys() == want.keys()
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, first {bad[:3]}"
    check = verify_streamed_prune(out, rep)
    assert check["verified"] == check["tensors"] and check["block_sparsity"] == rep.block_sparsity


# ------------------------------------------------------------------ the streamed pre-flight


class WiredConfig(transformers.PretrainedConfig):
    """A toy causal LM whose blocks are wired by `wiring`: "per_layer" (each block gets its
    own slice of a tensor made from the tokens, as Gemma-4's per-layer inputs) or
    "accumulating" (each block reads the outputs of the blocks before it)."""

    model_type = "fastprune_wired"

    def __init__(self, wiring="per_layer", vocab_size=VOCAB, hidden_size=16, layers=3, **kw):
        self.wiring, self.vocab_size, self.hidden_size = wiring, vocab_size, hidden_size
        self.num_hidden_layers = layers
        super().__init__(**kw)


class WiredBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, per_layer_input=None, block_states=(), **kw):
        g = torch.nn.functional.gelu(self.up(x + sum(block_states, torch.zeros_like(x))))
        return x + self.down(g if per_layer_input is None else g * per_layer_input)


class WiredLM(transformers.PreTrainedModel):
    config_class = WiredConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        d, n = config.hidden_size, config.num_hidden_layers
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.model.per_layer = nn.Embedding(config.vocab_size, n * 2 * d)
        self.model.layers = nn.ModuleList(WiredBlock(d) for _ in range(n))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear | nn.Embedding):
            torch.nn.init.normal_(module.weight, std=0.3)
        if isinstance(module, nn.Linear):
            torch.nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids, use_cache=False, **kw):
        h, states = self.model.embed_tokens(input_ids), []
        pli = self.model.per_layer(input_ids).unflatten(-1, (-1, len(self.model.layers)))
        for i, block in enumerate(self.model.layers):
            if self.config.wiring == "per_layer":
                h = block(h, per_layer_input=pli[..., i])
            else:
                h = block(h, block_states=states)
                states.append(h)
        return transformers.modeling_outputs.CausalLMOutput(logits=h)


if WiredConfig.model_type not in transformers.CONFIG_MAPPING:
    transformers.AutoConfig.register(WiredConfig.model_type, WiredConfig)
    transformers.AutoModelForCausalLM.register(WiredConfig, WiredLM)


def _saved_wired(wiring, tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / f"{wiring}-src"
    WiredLM(WiredConfig(wiring)).save_pretrained(folder, max_shard_size="8KB")
    return folder


def _gemma4_uniform(tmp_path):
    """Gemma-4 with every block of one kind: per-layer inputs are its blocks' own."""
    if "gemma4_text" not in transformers.CONFIG_MAPPING:
        pytest.skip("this transformers has no gemma4_text")
    cfg = transformers.CONFIG_MAPPING["gemma4_text"](
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        pad_token_id=0, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8,
        sliding_window=8, layer_types=["full_attention"] * 3,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "gemma4-src"
    transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(
        folder, max_shard_size=SHARD
    )
    return folder


@pytest.mark.parametrize("source", ["wired", "gemma4"])
def test_streamed_blocks_with_their_own_arguments_equal_in_memory(tmp_path, source):
    """Blocks that get arguments of their own (per-layer inputs) are found by the streamed
    pre-flight too and calibrated on their real arguments: the in-memory prune, bit for bit."""
    src = _gemma4_uniform(tmp_path) if source == "gemma4" else _saved_wired("per_layer", tmp_path)
    assert len(list(src.glob("*.safetensors"))) >= 3
    model = _load(src)
    calib = calib_ids(n=4, seqlen=16)
    kw = {"method": "sparsegpt", "sparsity": 0.5, "batch_size": 2, "progress": False}
    ref = fp.prune_model(model, calib, **kw)
    own = list(range(1, len(ref.totals["preflight"]["own_arguments"]) + 1))
    assert ref.totals["preflight"]["own_arguments"] == own and own  # all blocks but the first
    out = tmp_path / "pruned"
    rep = prune_checkpoint(src, out, calib, **kw)
    assert rep.totals["preflight"] == ref.totals["preflight"]
    assert [(a.name, a.loss) for a in rep.layers] == [(b.name, b.loss) for b in ref.layers]
    got, want = _load(out).state_dict(), model.state_dict()
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, first {bad[:3]}"


def test_streamed_state_from_earlier_blocks_is_refused_as_in_memory(tmp_path):
    """A block whose argument is made from earlier blocks' outputs is refused streamed with
    the in-memory message, before the output folder is made."""
    src = _saved_wired("accumulating", tmp_path)
    before = _files_digest(src)
    calib = calib_ids(n=2, seqlen=8)
    with pytest.raises(ValueError) as in_memory:
        fp.prune_model(_load(src), calib, method="sparsegpt", sparsity=0.5, progress=False)
    assert "its argument block_states depends on the outputs of earlier blocks" in str(
        in_memory.value
    )
    out = tmp_path / "pruned"
    with pytest.raises(ValueError) as streamed:
        prune_checkpoint(src, out, calib, method="sparsegpt", sparsity=0.5, progress=False)
    assert str(streamed.value) == str(in_memory.value)
    assert streamed.value.pruned_blocks == []
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))
    assert _files_digest(src) == before


@pytest.mark.parametrize(("family", "method"), [("llama", "sparsegpt"), ("qwen3_moe", "wanda"),
                                                ("qwen3_moe", "magnitude")])  # fmt: skip
def test_the_streamed_preflight_holds_two_blocks_at_most(tmp_path, monkeypatch, family, method):
    """The streamed pre-flight loads each block when the forward calls it and releases it
    once replayed: at most two blocks' weights at a time; its summary is the in-memory one."""
    src = _saved(family, tmp_path)
    calib = None if method == "magnitude" else calib_ids(n=2, seqlen=8)
    ref = fp.prune_model(_load(src), calib, method=method, sparsity=0.5, progress=False)
    held, peak, loaded, phase = set(), {}, {}, ["setup"]
    load, release = BlockLoader.load, BlockLoader.release

    def counted_load(self, module, prefix="", *a, **k):
        if prefix.startswith("model.layers."):
            held.add(id(module))
            loaded.setdefault(phase[0], set()).add(prefix)
            peak[phase[0]] = max(peak.get(phase[0], 0), len(held))
        return load(self, module, prefix, *a, **k)

    def counted_release(self, module):
        held.difference_update(id(m) for m in module.modules())
        return release(self, module)

    def in_phase(name, stage):
        def run(self, *a):
            phase[0] = name
            try:
                return stage(self, *a)
            finally:
                phase[0] = "blocks"

        return run

    monkeypatch.setattr(BlockLoader, "load", counted_load)
    monkeypatch.setattr(BlockLoader, "release", counted_release)
    monkeypatch.setattr(PruneRun, "preflight", in_phase("preflight", PruneRun.preflight))
    rep = prune_checkpoint(src, tmp_path / "pruned", calib, method=method, sparsity=0.5,
                           progress=False)  # fmt: skip
    nblocks = rep.totals["blocks"]
    assert loaded["preflight"] == {f"model.layers.{i}" for i in range(nblocks)}
    # replayed once the next block returned: two held then; without calibration, one
    assert peak["preflight"] == (1 if calib is None else 2) and peak["blocks"] == 1
    assert not held
    assert rep.totals["preflight"] == ref.totals["preflight"]


def test_tokenizer_and_dtype(tmp_path):
    src = _saved("llama", tmp_path)
    out = tmp_path / "pruned"
    calib = calib_ids(n=2, seqlen=8)
    rep = prune_checkpoint(
        src, out, calib, method="wanda", dtype=torch.bfloat16, tokenizer=byte_tokenizer(),
        progress=False,
    )  # fmt: skip
    assert rep.achieved_sparsity > 0.45
    assert (out / "tokenizer_config.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"method": "gblm"}, "needs gradients"),
        ({"method": "wanda", "allocation": "owl"}, "allocation='owl'"),
        ({"method": "no-such"}, "method must be one of"),
        ({"method": "wanda", "sparsity": 1.5}, "sparsity"),
    ],
)
def test_refused_before_any_work(tmp_path, kw, needle):
    src = _saved("llama", tmp_path)
    out = tmp_path / "pruned"
    calib = calib_ids(n=2, seqlen=8)
    with pytest.raises(ValueError, match=needle):
        prune_checkpoint(src, out, calib, progress=False, **kw)
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))  # nor a partial folder


def test_output_into_source_refused(tmp_path):
    src = _saved("llama", tmp_path)
    calib = calib_ids(n=2, seqlen=8)
    for bad in (src, src / "inner"):
        with pytest.raises(ValueError, match="source checkpoint"):
            prune_checkpoint(src, bad, calib, method="wanda", progress=False)


def test_interrupt_leaves_a_marked_partial_folder(tmp_path, monkeypatch):
    src = _saved("llama", tmp_path)
    before = _files_digest(src)
    calib = calib_ids(n=2, seqlen=8)
    real = stream_mod.StreamedBlocks.leave

    def leave(self, i, block, prefix):
        if i == 1:
            raise KeyboardInterrupt
        return real(self, i, block, prefix)

    monkeypatch.setattr(stream_mod.StreamedBlocks, "leave", leave)
    out = tmp_path / "pruned"
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoint(src, out, calib, method="wanda", progress=False)
    assert not out.exists()
    (partial,) = tmp_path.glob(".pruned.partial-*")
    marker = json.loads((partial / PARTIAL).read_text())
    assert marker["partial"] and marker["status"] == "abandoned"
    assert "KeyboardInterrupt" in marker["reason"]
    assert _files_digest(src) == before


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_streamed_perplexity_equals_in_memory(tmp_path, family):
    src = _saved(family, tmp_path)
    ids = calib_ids(n=1, seqlen=40).reshape(-1)
    ref = fp.perplexity(_load(src), ids, seqlen=8, max_windows=4)
    got = stream_mod.streamed_perplexity(src, ids, seqlen=8, max_windows=4)
    assert got["windows"] == ref["windows"] == 4 and got["tokens"] == ref["tokens"]
    assert got["nll"] == pytest.approx(ref["nll"], rel=1e-5)


def test_cli_stream_matches_in_memory(tmp_path, capsys):
    from fastprune.app.cli import main

    src = _saved("llama", tmp_path)
    byte_tokenizer().save_pretrained(src)
    flags = ["--model", str(src), "--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "3"]
    flags += ["--seqlen", "16", "--eval-windows", "2", "--no-progress"]
    runs = {}
    for label, extra in (("memory", ["--no-stream"]), ("streamed", ["--stream"])):
        out, rep = tmp_path / label, tmp_path / f"{label}.json"
        assert main(["prune", *flags, *extra, "--save", str(out), "--report", str(rep)]) == 0
        runs[label] = (out, json.loads(rep.read_text()))
    text = capsys.readouterr().out
    assert "streamed, peak host memory" in text and "in memory, peak host memory" in text
    (mem_dir, mem), (st_dir, st) = runs["memory"], runs["streamed"]
    assert st["path"] == "streamed" and mem["path"] == "in memory"
    assert st["ppl_dense"] == pytest.approx(mem["ppl_dense"], rel=1e-6)
    assert st["ppl_pruned"] == pytest.approx(mem["ppl_pruned"], rel=1e-6)
    assert st["saved"]["verified"] == st["saved"]["tensors"]
    a, b = _load(mem_dir).state_dict(), _load(st_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (st_dir / "tokenizer_config.json").is_file()


def test_cli_stream_needs_a_checkpoint_and_a_save_folder(tmp_path, capsys):
    from fastprune.app.cli import main

    src = _saved("llama", tmp_path)
    byte_tokenizer().save_pretrained(src)
    cases = [
        (["--stream"], "give --save"),
        (["--stream", "--save", str(src / "x")], "source checkpoint"),
        (["--stream", "--save", str(tmp_path / "o"), "--method", "gblm"], "gradients"),
        (["--stream", "--save", str(tmp_path / "o"), "--allocation", "owl"], "--allocation"),
    ]
    for extra, needle in cases:
        assert main(["prune", "--model", str(src), *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err, (extra, err)


def test_auto_streams_when_the_model_does_not_fit(tmp_path, monkeypatch):
    from fastprune.app import workflow
    from fastprune.streaming import checkpoint as checkpoint_mod

    src = _saved("llama", tmp_path)
    job = workflow.PruneJob(model=str(src), save=str(tmp_path / "o"))
    assert workflow.streaming_decision(job, say=lambda *a, **k: None) is False
    monkeypatch.setattr(checkpoint_mod, "available_host_memory", lambda: 1000)
    said = []
    assert workflow.streaming_decision(job, say=lambda *a, **k: said.append(a)) is True
    assert "block by block" in said[0][0]
    with pytest.raises(ValueError, match="give a save folder"):
        workflow.streaming_decision(workflow.PruneJob(model=str(src)))


def _stream_worker(rank: int, init: str, out: str, src: str, save: str) -> None:
    import torch.distributed as dist

    from fastprune.pipeline.stream import prune_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    args = (calib_ids(n=5, seqlen=16), "sparsegpt", 0.5, 2, 4)
    try:
        model = _load(src)  # the same prune in memory, each rank with its replica
        fp.prune_model(model, *args, progress=False)
        method, sparsity, n, m = args[1:]
        rep = prune_checkpoint(
            src, save, args[0], method=method, sparsity=sparsity, prune_n=n, prune_m=m,
            progress=False,
        )  # fmt: skip
        torch.save(
            {
                "layers": [(lr.name, lr.sparsity, lr.loss) for lr in rep.layers],
                "totals": rep.totals,
                "in_memory": model.state_dict(),
            },
            f"{out}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_streamed_under_two_ranks_without_replicas(tmp_path):
    """Each rank streams the blocks (none holds the model), rank 0 alone writes; the result
    is the in-memory prune's under the same two ranks, bit for bit."""
    import torch.multiprocessing as tmp_mp

    src = _saved("qwen3_moe", tmp_path)
    save = tmp_path / "pruned"
    tmp_mp.start_processes(
        _stream_worker,
        args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "out"), str(src), str(save)),
        nprocs=2,
        start_method="spawn",
    )
    ranks = [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=False) for r in range(2)]
    assert ranks[0]["layers"] == ranks[1]["layers"]
    assert ranks[0]["totals"]["saved"] == str(save) and "saved" not in ranks[1]["totals"]
    assert all(r["totals"]["path"] == "streamed" for r in ranks)
    assert ranks[0]["totals"]["world_size"] == 2
    got, want = _load(save).state_dict(), ranks[0]["in_memory"]
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, first {bad[:3]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_streamed_on_cuda_equals_in_memory_on_cuda(tmp_path, family):
    """Blocks pruned on the GPU, streamed or in memory (the model on the CPU in both): the
    same weights; the streamed perplexity on the GPU equals the in-memory one."""
    src = _saved(family, tmp_path)
    model = _load(src)
    calib = calib_ids(n=4, seqlen=16)
    kw = {"method": "sparsegpt", "prune_n": 2, "prune_m": 4, "device": "cuda"}
    fp.prune_model(model, calib, progress=False, **kw)
    out = tmp_path / "pruned"
    prune_checkpoint(src, out, calib, progress=False, **kw)
    got, want = _load(out).state_dict(), model.state_dict()
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, first {bad[:3]}"
    ids = calib_ids(n=1, seqlen=40).reshape(-1)
    ref = fp.perplexity(model, ids, seqlen=8, max_windows=4, device="cuda")
    got_ppl = stream_mod.streamed_perplexity(out, ids, seqlen=8, max_windows=4, device="cuda")
    assert got_ppl["nll"] == pytest.approx(ref["nll"], rel=1e-4)
