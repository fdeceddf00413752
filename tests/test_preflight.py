"""The pre-flight pass: one forward of one calibration sample before any weight changes, with
every block and planned layer hooked. Toy models for each way a block can fail the
pipeline's assumptions: refused with the model unchanged, or pruned with a replay that
reproduces the real forward."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastprune as fp
from fastprune.models import find_blocks
from fastprune.pipeline.capture import block_kinds, capture_inputs, run_block
from fastprune.pipeline.preflight import ROUTER, own_kinds, preflight
from fastprune.pipeline.stages import PruneRun

D, VOCAB, LAYERS = 16, 64, 3


def _ids(n=4, t=8, seed=0):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


class MLPBlock(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def mlp(self, x):
        return self.down(F.gelu(self.up(x)))

    def forward(self, x, **kw):
        return x + self.mlp(x)


class Toy(nn.Module):
    """A causal-LM-shaped toy: embeddings, a list of blocks, no head (the last hidden states
    are the logits). `call(i, block, h, state)` wires the blocks; subclasses change it."""

    block = MLPBlock

    def __init__(self, seed=0, **kw):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(vocab_size=VOCAB)
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(self.block(**kw) for _ in range(LAYERS))

    def start(self, h):
        return {}

    def call(self, i, block, h, state):
        return block(h)

    def forward(self, input_ids, use_cache=False, **kw):
        h = self.embed(input_ids)
        state = self.start(h)
        for i, block in enumerate(self.layers):
            h = self.call(i, block, h, state)
        return SimpleNamespace(logits=h)


def _refused(model, match, **kw):
    """prune_model refuses `model` with a ValueError matching `match`; the weights are bit
    for bit what they were."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        fp.prune_model(model, _ids(), method=kw.pop("method", "sparsegpt"), sparsity=0.5, **kw)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ layers not hooked as planned


class WeightMatmulBlock(MLPBlock):
    def __init__(self, d=D):
        super().__init__(d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, **kw):
        return x + self.mlp(x) + (x @ self.proj.weight.t())


class TwiceBlock(MLPBlock):
    def __init__(self, d=D):
        super().__init__(d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, **kw):
        return x + self.mlp(self.proj(torch.tanh(self.proj(x))))


class WeightMatmul(Toy):
    block = WeightMatmulBlock


class Twice(Toy):
    block = TwiceBlock


def test_a_linear_used_through_its_weight_is_refused_before_any_change():
    _refused(WeightMatmul(), r"layers\.0\.proj: its weight is used directly")


def test_a_linear_used_through_its_weight_prunes_when_ignored():
    model = WeightMatmul()
    report = fp.prune_model(model, _ids(), method="sparsegpt", sparsity=0.5, ignore=["proj"])
    assert {lr.name.partition(".")[2] for lr in report.layers} == {"up", "down"}


def test_a_linear_called_twice_is_refused_saying_so():
    _refused(Twice(), r"layers\.0\.proj: it is called 2 times in one forward of the block")


class SharedBlock(Toy):
    """One block object at two places of the block list (Zamba's shared transformer)."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.layers[2] = self.layers[0]


class SharedLinear(Toy):
    """One linear object in two blocks."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.layers[1].up = self.layers[0].up


def test_a_block_shared_by_two_places_is_refused_saying_so():
    _refused(SharedBlock(), r"layers\.0 ran 2 times in one forward of the model \(one module "
             r"object, also the blocks' block 2: it runs at each\)")  # fmt: skip


def test_a_linear_shared_by_two_blocks_is_refused_saying_so():
    _refused(SharedLinear(), r"layers\.0\.up: it is one module object shared with block 1\.up, "
             r"so its hooks see the calls of every place that holds it \(2 in one "
             r"forward\)")  # fmt: skip


def test_each_blocks_records_are_freed_once_the_next_block_returned(monkeypatch):
    """The pre-flight replays a block when the next one has returned and frees its input and
    output: after each block returns, only its own are held (not one per block)."""
    from fastprune.pipeline import preflight as pf

    probes, held = [], []
    init, leave = pf._BlockProbe.__init__, pf._BlockProbe._leave

    def init_and_keep(self, *a, **k):
        init(self, *a, **k)
        probes.append(self)

    def leave_and_count(self, *a):
        leave(self, *a)
        if not self.mode.replaying:  # a real return, not the replay of an earlier block
            held.append(sum(p.hidden is not None or bool(p.outputs) for p in probes))

    monkeypatch.setattr(pf._BlockProbe, "__init__", init_and_keep)
    monkeypatch.setattr(pf._BlockProbe, "_leave", leave_and_count)
    report = fp.prune_model(Toy(), _ids(), method="sparsegpt", sparsity=0.5)
    assert held == [1] * LAYERS
    assert all(p.replayed is not None for p in probes)
    assert report.totals["preflight"]["replay_error"] <= 1e-6


# ------------------------------------------------------------------ arguments of each block


class PerLayer(Toy):
    """Gemma-style per-layer inputs: block i gets its own slice of a tensor made from the
    tokens."""

    class block(MLPBlock):  # noqa: N801
        def forward(self, x, per_layer_input=None, **kw):
            return x + self.down(F.gelu(self.up(x)) * per_layer_input)

    def __init__(self, seed=0):
        super().__init__(seed)
        self.per_layer = nn.Embedding(VOCAB, LAYERS * 2 * D)

    def start(self, h):
        return {"pli": self.per_layer(self._ids).unflatten(-1, (2 * D, LAYERS))}

    def call(self, i, block, h, state):
        return block(h, per_layer_input=state["pli"][..., i])

    def forward(self, input_ids, use_cache=False, **kw):
        self._ids = input_ids
        return super().forward(input_ids)


def test_per_layer_arguments_are_captured_for_each_block_and_replay_the_real_forward():
    model = PerLayer()
    ids = _ids()
    path, blocks = find_blocks(model)
    layouts = [fp.pipeline.block_layers.find_block_layers(b) for b in blocks]
    kinds = block_kinds(model, len(blocks))
    verdict = preflight(model, blocks, layouts, kinds, path, ids[:1])
    assert verdict.own_arguments == [1, 2]  # the first block's slice replays none of them
    kinds = own_kinds(kinds, verdict)
    acts = capture_inputs(model, blocks, kinds, ids, 2, torch.device("cpu"), None)
    for i, block in enumerate(blocks):
        run_block(block, acts, 2, "cpu", acts.arg_sets, kinds[i])
        acts.swap()
    torch.testing.assert_close(acts.inps, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_per_layer_arguments_prune_with_their_own_arguments():
    model = PerLayer()
    report = fp.prune_model(model, _ids(), method="sparsegpt", sparsity=0.5)
    assert report.totals["preflight"]["own_arguments"] == [1, 2]
    assert report.totals["preflight"]["replay_error"] < 1e-4
    assert abs(report.achieved_sparsity - 0.5) < 0.01


class Accumulating(Toy):
    """Every block reads the outputs of the blocks before it (a growing list)."""

    class block(MLPBlock):  # noqa: N801
        def forward(self, x, block_states=(), **kw):
            return x + self.mlp(x + sum(block_states, torch.zeros_like(x)))

    def start(self, h):
        return {"states": []}

    def call(self, i, block, h, state):
        h = block(h, block_states=state["states"])
        state["states"].append(h)
        return h


def test_an_argument_made_from_earlier_blocks_is_refused_naming_it():
    _refused(Accumulating(), r"layers\.1: its argument block_states depends on the outputs of "
                             r"earlier blocks \(0\)")  # fmt: skip


class SharedKV(Toy):
    """The first block's projection is shared through a dict with the blocks after it."""

    class block(MLPBlock):  # noqa: N801
        def __init__(self, d=D):
            super().__init__(d)
            self.kv = nn.Linear(d, d)

        def forward(self, x, shared=None, **kw):
            if "kv" not in shared:
                shared["kv"] = self.kv(x)
            return x + self.mlp(x * torch.sigmoid(shared["kv"]))

    def start(self, h):
        return {"shared": {}}

    def call(self, i, block, h, state):
        return block(h, shared=state["shared"])


def test_kv_shared_from_an_earlier_block_is_refused():
    _refused(SharedKV(), r"layers\.1\.kv: it is never called")
    _refused(SharedKV(), r"layers\.1: its argument shared depends on the outputs of earlier "
                         r"blocks \(0\)", ignore=["kv"])  # fmt: skip


class PassedIndices(Toy):
    """HunYuan-V4-style: each block hands the next its top-k choices."""

    class block(MLPBlock):  # noqa: N801
        def __init__(self, d=D):
            super().__init__(d)
            self.pick = nn.Linear(d, 2 * d)

        def forward(self, x, prev_topk=None, **kw):
            scores = self.pick(x)
            idx = scores.topk(2, dim=-1).indices if prev_topk is None else prev_topk
            gate = torch.zeros(*x.shape[:-1], 2 * D).scatter(-1, idx, 1.0)
            return x + self.down(F.gelu(self.up(x)) * gate), idx

    def start(self, h):
        return {"idx": None}

    def call(self, i, block, h, state):
        h, state["idx"] = block(h, prev_topk=state["idx"])
        return h


def test_indices_passed_from_block_to_block_are_refused():
    _refused(PassedIndices(), r"layers\.1: its argument prev_topk depends on the outputs")


class HiddenState(Toy):
    """Blocks read state the model sets on them, not passed as an argument."""

    class block(MLPBlock):  # noqa: N801
        def forward(self, x, **kw):
            return x + self.mlp(x) * self.context["scale"]

    def __init__(self, seed=0):
        super().__init__(seed)
        self.context = {}
        for b in self.layers:
            b.context = self.context  # one dict, set by the model before each block

    def call(self, i, block, h, state):
        self.context["scale"] = float(h.abs().mean())
        return block(h)


def test_a_block_reading_state_outside_its_arguments_is_refused():
    _refused(HiddenState(), r"layers\.0: replayed on its own arguments, the block's output "
                            r"differs.*not among its arguments")  # fmt: skip


# ------------------------------------------------------------------ experts and routers


class GammaExperts(nn.Module):
    """Shared experts stored as 3-D weights and called with float mixing weights."""

    def __init__(self, n=2, d=D, inter=8):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n, 2 * inter, d) / 4)
        self.down_proj = nn.Parameter(torch.randn(n, d, inter) / 4)
        self.act_fn = F.silu

    def forward(self, hidden, gammas):
        out = 0
        for e in range(self.gate_up_proj.shape[0]):
            g, u = F.linear(hidden, self.gate_up_proj[e]).chunk(2, -1)
            out = out + gammas[..., e : e + 1] * F.linear(self.act_fn(g) * u, self.down_proj[e])
        return out


class GammaBlock(MLPBlock):
    def __init__(self, d=D):
        super().__init__(d)
        self.shared_experts = GammaExperts()
        self.mix = nn.Linear(d, 2)

    def forward(self, x, **kw):
        return x + self.mlp(x) + self.shared_experts(x, torch.softmax(self.mix(x), -1))


class Gamma(Toy):
    block = GammaBlock


def test_experts_called_with_float_weights_are_refused_naming_the_module():
    _refused(Gamma(), r"layers\.0\.shared_experts is called in a way fastprune does not read: "
                      r"its second argument holds torch\.float32 values, not integer")  # fmt: skip


class ScoreMoE(nn.Module):
    """An MoE whose router is a plain linear named `score` feeding the top-k."""

    def __init__(self, d=D, n=4):
        super().__init__()
        self.score = nn.Linear(d, n, bias=False)
        self.experts = nn.ModuleList(MLPBlock(d) for _ in range(n))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = torch.topk(torch.softmax(self.score(flat), -1), 2, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out[tok] += w[tok, slot, None] * expert.mlp(flat[tok])
        return out.reshape(x.shape)


class ScoreBlock(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.moe = ScoreMoE(d)

    def forward(self, x, **kw):
        x = x + self.attn(x)
        return x + self.moe(x)


class Score(Toy):
    block = ScoreBlock


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_a_router_named_score_is_found_by_structure_and_left_dense(method):
    model = Score()
    before = [b.moe.score.weight.clone() for b in model.layers]
    report = fp.prune_model(model, None if method == "magnitude" else _ids(), method=method,
                            sparsity=0.5)  # fmt: skip
    for i, b in enumerate(model.layers):
        torch.testing.assert_close(b.moe.score.weight, before[i], rtol=0, atol=0)
        assert {"name": f"{i}.moe.score.weight", "shape": [4, D], "reason": ROUTER} in report.dense
    names = {lr.name.partition(".")[2] for lr in report.layers}
    assert "attn" in names and "moe.experts.0.up" in names
    assert not any("score" in n for n in names)
    assert report.totals["preflight"]["routers"] == {str(i): ["moe.score"] for i in range(3)}


# ------------------------------------------------------------------ a stop in the middle


def test_a_stop_in_the_middle_says_which_blocks_were_pruned(monkeypatch):
    model = Toy()
    dense = copy.deepcopy(model.state_dict())
    solve = PruneRun.solve_block

    def stop_at_block_1(self, i, hooks):
        if i == 1:
            raise KeyboardInterrupt
        solve(self, i, hooks)

    monkeypatch.setattr(PruneRun, "solve_block", stop_at_block_1)
    with pytest.raises(KeyboardInterrupt) as info:
        fp.prune_model(model, _ids(), method="sparsegpt", sparsity=0.5)
    assert info.value.pruned_blocks == [0]
    assert any("blocks 0..0 of layers are pruned" in n for n in info.value.__notes__)
    after = model.state_dict()
    assert not torch.equal(after["layers.0.up.weight"], dense["layers.0.up.weight"])
    for k in after:
        if not k.startswith("layers.0."):
            assert torch.equal(after[k], dense[k]), k


def test_a_refusal_says_nothing_was_changed():
    with pytest.raises(ValueError) as info:
        fp.prune_model(Twice(), _ids(), method="sparsegpt", sparsity=0.5)
    assert info.value.pruned_blocks == []


# ------------------------------------------------------------------ transformers families


def _family(name, **kw):
    transformers = pytest.importorskip("transformers")
    if name not in transformers.CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {name}")
    base = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    cfg = transformers.CONFIG_MAPPING[name](**(base | kw))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).float().eval()


def _hf_ids(n=4, t=16):
    return torch.randint(1, 256, (n, t), generator=torch.Generator().manual_seed(1))


def _hf_refused(model, match, **kw):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        fp.prune_model(model, _hf_ids(), method="sparsegpt", sparsity=0.5, progress=False, **kw)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_jamba_dt_proj_used_through_its_weight_is_refused():
    model = _family("jamba", num_hidden_layers=2, num_experts=4, num_experts_per_tok=2)
    _hf_refused(model, r"model\.layers\.0\.mamba\.dt_proj: its weight is used directly")
    report = fp.prune_model(model, _hf_ids(), method="sparsegpt", sparsity=0.5, progress=False,
                            ignore=["mamba.dt_proj"])  # fmt: skip
    assert {"name": "0.mamba.dt_proj.weight", "shape": [64, 2], "reason": "ignored (ignore=)"} in (
        report.dense
    )
    assert report.totals["preflight"]["replay_error"] < 1e-4


def test_hy_v4_topk_indices_passed_between_blocks_are_refused():
    model = _family("hy_v4")
    _hf_refused(model, r"its argument prev_topk_indices depends on the outputs of earlier blocks")


def test_gemma3n_stacked_hidden_states_are_refused():
    model = _family(
        "gemma3n_text", num_kv_shared_layers=2, vocab_size_per_layer_input=256,
        hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )  # fmt: skip
    _hf_refused(model, r"model\.layers\.0 takes hidden states \[2, 1, 16, 32\]")


def test_gemma4_per_layer_inputs_replay_the_real_forward_block_by_block():
    model = _family(
        "gemma4_text", vocab_size_per_layer_input=256, hidden_size_per_layer_input=8,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
    )  # fmt: skip
    ids = _hf_ids()
    path, blocks = find_blocks(model)
    layouts = [fp.pipeline.block_layers.find_block_layers(b) for b in blocks]
    kinds = block_kinds(model, len(blocks))
    verdict = preflight(model, blocks, layouts, kinds, path, ids[:1])
    assert verdict.own_arguments == [2, 3]  # per-layer inputs differ from their kind's first
    kinds = own_kinds(kinds, verdict)
    real = []
    handle = blocks[-1].register_forward_hook(lambda m, a, out: real.append(out))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    acts = capture_inputs(model, blocks, kinds, ids, 2, torch.device("cpu"), None)
    for i, block in enumerate(blocks):
        run_block(block, acts, 2, "cpu", acts.arg_sets, kinds[i])
        acts.swap()
    want = real[0][0] if isinstance(real[0], tuple) else real[0]
    torch.testing.assert_close(acts.inps, want, rtol=1e-4, atol=1e-5)
    report = fp.prune_model(model, ids, method="sparsegpt", sparsity=0.5, progress=False)
    assert report.totals["preflight"]["own_arguments"] == [2, 3]


def _ernie_text_model():
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.models.ernie4_5_vl_moe import modeling_ernie4_5_vl_moe as m
    except ImportError:
        pytest.skip("this transformers has no ernie4_5_vl_moe")
    cfg = transformers.CONFIG_MAPPING["ernie4_5_vl_moe_text"](
        vocab_size=256, hidden_size=128, intermediate_size=64, moe_intermediate_size=[16, 16],
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, moe_k=2,
        max_position_embeddings=64, moe_num_experts=4, pad_token_id=0,
        rope_parameters={"rope_theta": 1e4, "rope_type": "default", "mrope_section": [12, 12, 8]},
    )  # fmt: skip
    torch.manual_seed(0)

    class TextLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = m.Ernie4_5_VLMoeTextModel(cfg).float().eval()
            self.config = cfg

        def forward(self, input_ids, use_cache=False, **kw):
            return self.model(input_ids=input_ids, use_cache=False)

    return TextLM()


def test_ernie_vl_vision_experts_without_text_tokens_are_refused_then_ignored():
    model = _ernie_text_model()
    _hf_refused(model, r"model\.layers\.1\.mlp\.vision_moe\.experts: it is never called.*"
                       r"ignore=\['mlp\.vision_moe\.experts\.\*'\]")  # fmt: skip
    report = fp.prune_model(model, _hf_ids(), method="sparsegpt", sparsity=0.5, progress=False,
                            ignore=["mlp.vision_moe.experts.*"])  # fmt: skip
    names = {lr.name for lr in report.layers}
    assert any("text_moe.experts" in n for n in names)
    assert not any("vision_moe" in n for n in names)


# ------------------------------------------------------------------ several ranks and streaming


def _dist_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model = Score()
        report = fp.prune_model(model, _ids(), method="sparsegpt", sparsity=0.5, progress=False)
        try:
            fp.prune_model(Twice(), _ids(), method="sparsegpt", sparsity=0.5, progress=False)
            refused = None
        except Exception as e:  # recorded for the parent's checks
            refused = (type(e).__name__, str(e))
        res = (model.state_dict(), report.totals["preflight"], refused)
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_rank_reaches_the_same_verdict(tmp_path):
    """Under torch.distributed (gloo, 2 ranks) every rank runs the pre-flight on the same
    sample: the same routers left dense, the same pruned model, the same refusal."""
    from torch import multiprocessing as tmp_mp

    out = tmp_path / "out"
    tmp_mp.start_processes(_dist_worker, args=(f"file://{tmp_path / 'rdv'}", str(out)),
                           nprocs=2, start_method="spawn")  # fmt: skip
    (w0, v0, r0), (w1, v1, r1) = (torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1))
    assert v0 == v1 and v0["routers"] == {str(i): ["moe.score"] for i in range(LAYERS)}
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert r0 is not None and r1 is not None
    assert "layers.0.proj: it is called 2 times" in r0[1] + r1[1]


class _OnDemand:
    """A toy's blocks on the meta device, each loaded from a copy of its weights when the
    pre-flight calls `load(i)` and put back on the meta device at `release(i)`."""

    def __init__(self, model):
        self.blocks = model.layers
        self.saved = [copy.deepcopy(b.state_dict()) for b in self.blocks]
        for b in self.blocks:
            b.to("meta")
        self.held, self.peak, self.loads = set(), 0, 0

    def load(self, i):
        self.blocks[i].to_empty(device="cpu").load_state_dict(self.saved[i])
        self.held.add(i)
        self.peak, self.loads = max(self.peak, len(self.held)), self.loads + 1

    def release(self, i):
        self.blocks[i].to("meta")
        self.held.discard(i)


def _verdict(model, on_demand=None, replay=True):
    from fastprune.pipeline.block_layers import find_block_layers

    path, blocks = find_blocks(model)
    layouts = [find_block_layers(b) for b in blocks]
    kinds = block_kinds(model, len(blocks))
    try:
        return preflight(model, blocks, layouts, kinds, path, _ids()[:1], replay, on_demand)
    except ValueError as e:
        return str(e)


@pytest.mark.parametrize(
    "toy", [Toy, PerLayer, Accumulating, HiddenState, WeightMatmul, Twice, Score, Gamma]
)
@pytest.mark.parametrize("replay", [True, False])
def test_blocks_loaded_on_demand_reach_the_in_memory_verdict(toy, replay):
    """The streamed path's pre-flight (`on_demand`): each block loaded when the forward calls
    it and released once its record is taken (replayed when the next returns: two held at
    most); the same verdict or refusal as with every block in memory; none left loaded."""
    want = _verdict(toy(), replay=replay)
    model = toy()
    source = _OnDemand(model)
    got = _verdict(model, source, replay)
    if isinstance(want, str):
        assert got == want
    else:
        assert got == want and got.replay_error == want.replay_error
        assert source.loads == LAYERS  # each block once: the replay runs it while held
    assert 1 <= source.peak <= (2 if replay else 1) and not source.held
    assert all(p.device.type == "meta" for p in model.layers.parameters())


def test_the_hessian_hooks_name_a_linear_called_twice():
    """Past the pre-flight too, a linear called twice in one forward is named as such, not
    taken for a change between batches."""
    from fastprune.pipeline.block_layers import find_block_layers
    from fastprune.pipeline.hessian_hooks import HessianHooks

    block = TwiceBlock()
    hooks = HessianHooks(block, find_block_layers(block), "cpu")
    try:
        with pytest.raises(ValueError, match="proj is called twice in one forward of its block"):
            block(torch.randn(2, 8, D))
    finally:
        hooks.remove()


class WeightMatmulExperts(Score):
    """An expert MLP whose `up` is used through its weight."""

    def __init__(self, seed=0):
        super().__init__(seed)
        for b in self.layers:
            for expert in b.moe.experts:
                expert.mlp = lambda x, e=expert: e.down(F.gelu(x @ e.up.weight.t() + e.up.bias))


def test_an_expert_linear_used_through_its_weight_is_refused():
    _refused(WeightMatmulExperts(), r"layers\.0\.moe\.experts\.0\.up: its weight is used directly")
