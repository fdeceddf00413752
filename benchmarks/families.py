"""Every causal-LM family of the installed transformers, built tiny and random on the CPU, pruned
with SparseGPT 50% and Wanda 2:4 on a tiny calibration, and checked: either each block's GEMM
weights reach the target and every matrix left dense (routers among them) is bit for bit what
it was, or the prune is refused before any weight changes with fastprune's own error.

    python -m benchmarks.families [family ...] [--markdown docs/families.md]

prints the table (and writes the supported-families page); tests/test_families.py runs the
same sweep, one test per family.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import re
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

LAYERS = 2
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 64, 4, 2, 16, 64
EXPERTS, TOP_K = 4, 2
VOCAB = 256
NSAMPLES, SEQLEN = 2, 16
METHODS = {
    "SparseGPT 50%": dict(method="sparsegpt", sparsity=0.5),
    "Wanda 2:4": dict(method="wanda", prune_n=2, prune_m=4),
}
REPLAY_TOL = 1e-4  # the pre-flight's own bound on a float32 block replay

# config attributes, by what they size (ints; per-layer lists are cut to the layers kept)
_SIZES = (
    (HIDDEN, ("hidden_size", "n_embd", "d_model", "embed_dim", "model_dim", "word_embed_proj_dim",
              "embedding_size", "n_embed", "dim", "emb_dim", "embedding_dim")),
    (HEADS, ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
             "decoder_attention_heads", "num_attention_heads_per_layer", "index_n_heads",
             "index_num_heads", "indexer_n_heads")),
    (HEAD_DIM, ("head_dim", "kv_channels", "attention_head_dim", "d_head", "d_kv", "head_size",
                "swa_head_dim", "dim_head", "mamba_d_head", "mamba_headdim")),
    (FFN, ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "expert_dim",
           "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_ffn_dim",
           "encoder_ffn_dim", "moe_ffn_hidden_size", "intermediate_size_mlp", "mlp_dim",
           "dense_intermediate_size", "expert_intermediate_size", "ffn_hidden_dim", "inner_dim",
           "dff", "dim_ff", "mlp_only_intermediate_size")),
    (8, ("qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim", "rope_dim", "sliding_window",
         "state_size", "d_state", "ssm_state_size", "mamba_d_state", "chunk_size",
         "attention_window", "local_window_size", "sliding_window_size", "adapter_rank",
         "laurel_rank", "time_step_rank")),
    (16, ("v_head_dim", "kv_lora_rank", "index_head_dim", "hidden_size_per_layer_input")),
    (24, ("q_lora_rank",)),
    (128, ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length",
           "max_sequence_length")),
)  # fmt: skip
_AT_MOST = (
    (KV_HEADS, ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num",
               "num_query_groups", "n_head_kv", "num_key_value_groups")),
    (EXPERTS, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
              "num_routed_experts")),
    (TOP_K, ("num_experts_per_tok", "top_k", "moe_topk", "num_selected_experts", "moe_top_k",
            "n_activated_experts", "num_experts_per_token", "router_top_k", "moe_k")),
    (1, ("n_shared_experts", "num_shared_experts", "n_group", "topk_group", "first_k_dense_replace",
        "moe_num_shared_experts", "shared_expert_count", "num_dense_layers")),
)  # fmt: skip
_EXPERT_COUNTS = _AT_MOST[1][1]
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers",
                 "decoder_layers", "num_blocks")  # fmt: skip
_TOWER = re.compile("vision|visual|image|audio|speech|encoder")
_WIDTHS = (HIDDEN, HEAD_DIM, FFN)  # halved in the towers beside the text model
_FFN_NAME = re.compile(r"intermediate_size|ffn_dim|ffn_hidden|(^|_)d_ff$|_channels?$")
MAX_PARAMS = 4_000_000  # a shrunk model larger than this has a size the shrinking missed
# left unset (None) by some default configs although the model needs them
_UNSET = {"num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM}
_LAYER_LISTS = ("layer_types", "layers_block_type", "hybrid_override_pattern", "block_types")

# family-specific settings on top of the generic shrinking (attributes the generic pass gets
# wrong or leaves inconsistent)
OVERRIDES: dict[str, dict] = {
    "mamba2": {"num_heads": 8, "n_groups": 1},
    "zamba2": {"hybrid_layer_ids": [1], "attention_hidden_size": 2 * HIDDEN,
               "attention_head_dim": 2 * HIDDEN // HEADS},
    "kolibri1_1": {"index_layers": [1], "mlp_only_layers": [0], "kv_source_layers": [0, 1]},
    "gemma3n": {"num_kv_shared_layers": 0},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "qwen4_exp": {"indexer_n_heads": HEADS, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                       "indexer_budget": 8, "indexer_compress_ratio": 4},
    "dots1": {"n_routed_experts": EXPERTS, "n_shared_experts": 1, "num_experts_per_tok": TOP_K},
    "prophetnet": {"num_encoder_layers": LAYERS, "num_decoder_layers": LAYERS},
    "falcon_h1": {"mamba_d_ssm": 2 * HIDDEN},
    "zamba": {"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "hybrid"] * 2,
              "attention_hidden_size": 2 * HIDDEN, "mamba_dt_rank": 8},  # two shared blocks
    "recurrent_gemma": {"lru_width": HIDDEN, "attention_window_size": 8},
    "roc_bert": {"pronunciation_embed_dim": 32, "pronunciation_vocab_size": VOCAB,
                 "shape_embed_dim": 32, "shape_vocab_size": VOCAB},
    "reformer": {"attention_head_size": HEAD_DIM, "axial_pos_embds_dim": (32, 32),
                 "axial_pos_shape": (4, 4), "local_attn_chunk_length": 8,
                 "lsh_attn_chunk_length": 8, "feed_forward_size": FFN},
    "cohere_compass": {"rope_parameters": {
        t: {"rope_type": "default", "rope_theta": 10000.0}
        for t in ("full_attention", "sliding_attention")}},
}  # fmt: skip


def families() -> list[str]:
    """The model types of transformers' causal-LM mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _set(cfg, key, value) -> None:
    with contextlib.suppress(Exception):  # a derived property, or a value refused
        setattr(cfg, key, value)


def _get(cfg, key):
    try:
        return getattr(cfg, key, None)
    except Exception:  # an attribute that exists per layer only
        return None


def _kept_layers(types: list) -> list[int]:
    """Indices of at least `LAYERS` layers that hold each distinct layer type, the first
    occurrence of each, in model order."""
    first: dict = {}
    for i, t in enumerate(types):
        first.setdefault(t if not isinstance(t, list) else tuple(t), i)
    keep = sorted(first.values())
    extra = [i for i in range(len(types)) if i not in keep]
    return sorted(keep + extra[: max(0, LAYERS - len(keep))])


def shrink(cfg, scale: int = 1) -> None:
    """Shrink `cfg` (and the configs inside it) in place to a tiny model. The widths of the
    configs beside the text model's (vision and audio towers) are halved: smaller than the
    decoder, as in the real models, so the decoder's blocks are the largest."""
    text = _text_config(cfg)
    for name, sub in list(vars(cfg).items()):
        if hasattr(sub, "to_dict") and hasattr(sub, "model_type") and sub is not cfg:
            tower = sub is not text and _TOWER.search(name)
            shrink(sub, 2 * scale if tower else scale)
    attrs = {k: _get(cfg, k) for k in dir(cfg) if not k.startswith("_")}
    nlayers = next((attrs[k] for k in _LAYER_COUNTS if isinstance(attrs.get(k), int)), None)
    keep = list(range(min(LAYERS, nlayers or LAYERS)))
    for key in _LAYER_LISTS:
        types = attrs.get(key)
        if isinstance(types, list | str) and nlayers and len(types) == nlayers:
            keep = _kept_layers(list(types))
            break
    for key, value in attrs.items():
        listed = isinstance(value, list) or (isinstance(value, str) and key in _LAYER_LISTS)
        if listed and nlayers and len(value) == nlayers and nlayers > 1:
            picked = [value[i] for i in keep]
            _set(cfg, key, "".join(picked) if isinstance(value, str) else picked)
    for key in _LAYER_COUNTS:
        if isinstance(attrs.get(key), int):
            _set(cfg, key, len(keep))
    sized = list(_SIZES)
    sized.append((FFN, tuple(k for k in attrs if _FFN_NAME.search(k))))
    sized = [(size // scale if size in _WIDTHS else size, keys) for size, keys in sized]
    for size, keys in sized:
        for key in keys:
            value = attrs.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > size:
                _set(cfg, key, size)
            elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                _set(cfg, key, [min(v, size) for v in value])
    for most, keys in _AT_MOST:
        for key in keys:
            value = attrs.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > most:
                _set(cfg, key, most)
    for key, value in _UNSET.items():
        if key in attrs and attrs[key] is None:
            _set(cfg, key, value)
    if any(isinstance(attrs.get(k), int) for k in _EXPERT_COUNTS):
        for key in _AT_MOST[2][1]:
            if key in attrs and attrs[key] is None:
                _set(cfg, key, TOP_K)
    expand = next((attrs[k] for k in ("mamba_expand", "expand") if attrs.get(k)), None)
    d_head = next((_get(cfg, k) for k in ("mamba_d_head", "mamba_headdim") if k in attrs), None)
    if isinstance(expand, int) and isinstance(d_head, int):  # SSM heads tile the inner width
        for key in ("mamba_n_heads", "n_mamba_heads"):
            if key in attrs:
                _set(cfg, key, expand * HIDDEN // d_head)
    for key in ("vocab_size", "unpadded_vocab_size", "vocab_size_per_layer_input"):
        if isinstance(attrs.get(key), int) and attrs[key] > VOCAB:
            _set(cfg, key, VOCAB)
    if isinstance(attrs.get("vocab_size"), int):
        for key, value in attrs.items():
            if key.endswith("_token_id") and isinstance(value, int) and value >= VOCAB:
                _set(cfg, key, VOCAB - 1)
    mla = [_get(cfg, k) for k in ("qk_nope_head_dim", "qk_rope_head_dim")]
    if all(isinstance(v, int) for v in mla):  # multi-head latent attention's derived sizes
        _set(cfg, "qk_head_dim", sum(mla))
        if isinstance(_get(cfg, "num_key_value_heads"), int):  # one latent for every head
            _set(cfg, "num_key_value_heads", _get(cfg, "num_attention_heads"))
        if "head_dim" in attrs:
            _set(cfg, "head_dim", mla[1])
    if "is_decoder" in attrs:
        _set(cfg, "is_decoder", True)


def _path(cfg, dotted: str):
    """The config at `dotted` inside `cfg` (`attn_config`; "" is `cfg`)."""
    for part in filter(None, dotted.split(".")):
        cfg = getattr(cfg, part)
    return cfg


def _text_config(cfg):
    try:
        return cfg.get_text_config()
    except ValueError:  # several text configs (MusicGen's encoder and decoder)
        return cfg


def tiny_config(family: str):
    """`family`'s default config, shrunk, with the family's own overrides."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(family)
    shrink(cfg)
    text = _text_config(cfg)
    for key, value in OVERRIDES.get(family.removesuffix("_text"), {}).items():
        owner, _, leaf = key.rpartition(".")
        for c in {id(cfg): cfg, id(text): text}.values():
            setattr(_path(c, owner), leaf, value)
    return cfg


def build(family: str, seed: int = 0):
    """The tiny random model of `family` (float32, eval mode), seeded."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family)
    with torch.device("meta"):  # count first: a size the shrinking missed must not allocate
        sizes = {n: p.numel() for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    if sum(sizes.values()) > MAX_PARAMS:
        big = max(sizes, key=sizes.get)
        raise ValueError(f"not tiny: {sum(sizes.values()):,} parameters ({big}: {sizes[big]:,})")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    if family == "xmod":  # its adapters are per language: one is chosen for the forward
        model.set_default_language(cfg.languages[0])
    with torch.no_grad():  # matrices initialised to zeros would read as pruned
        for p in model.parameters():
            if p.dim() >= 2 and (p == 0).float().mean() > 0.01:
                p.normal_(0, 0.02)
    return model


def calibration(model, seed: int = 1) -> torch.Tensor:
    """`[NSAMPLES, SEQLEN]` random token ids, seeded."""
    vocab = getattr(model.config, "vocab_size", None) or VOCAB
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, VOCAB), (NSAMPLES, SEQLEN), generator=g)


# ------------------------------------------------------------------------------- the checks


@dataclass
class Result:
    status: str  # "pruned", "refused" or "FAIL"
    detail: str = ""
    dense: Counter = field(default_factory=Counter)  # reason -> matrices left dense


@dataclass
class Outcome:
    family: str
    built: str | None = None  # why it cannot be built tiny (None: built)
    results: dict[str, Result] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        return [f"{m}: {r.detail}" for m, r in self.results.items() if r.status == "FAIL"]


def _first_line(e: BaseException, limit: int = 240) -> str:
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0] if text else ''}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _raised_by_fastprune(e: BaseException) -> bool:
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and "/fastprune/" in frames[-1].filename.replace("\\", "/")


def _zero_fraction(t: torch.Tensor) -> float:
    return float((t == 0).sum()) / max(1, t.numel())


def _check_pruned(model, before, report, spec) -> list[str]:
    """What in the pruned `model` breaks the sweep's rules (empty: nothing)."""
    from fastprune.layers import get_weight
    from fastprune.models import find_blocks
    from fastprune.pipeline.block_layers import layer_kind_name, resolve_layer

    problems = []
    path, blocks = find_blocks(model, report.totals.get("blocks_path"))
    dense = {d["name"]: d["reason"] for d in report.dense}
    layers: dict[str, list[str]] = {}  # block parameter -> report layers on it
    for lr in report.layers:
        i, rel = lr.name.split(".", 1)
        kind = layer_kind_name(rel)
        param = kind if kind != rel else f"{rel}.weight"
        layers.setdefault(f"{i}.{param}", []).append(rel)
        layer = resolve_layer(blocks[int(i)], rel)
        try:
            W = get_weight(layer)
        except TypeError:  # no layer fastprune prunes (a router's own class)
            W = layer.weight
        if "prune_n" in spec:
            groups = W.reshape(W.shape[0], -1, 4)
            if W.shape[1] % 4 or not bool(((groups == 0).sum(-1) >= 2).all()):
                problems.append(f"{lr.name} is not 2:4 sparse")
        elif abs(_zero_fraction(W) - 0.5) > 0.02:
            problems.append(f"{lr.name} is {_zero_fraction(W):.3f} sparse, not 50%")
    prefix = f"{path}."
    for name, p in model.named_parameters():
        if not name.startswith(prefix) or p.dim() < 2:
            if not torch.equal(p, before[name]):
                problems.append(f"{name} (not a block matrix) changed")
            continue
        rel = name[len(prefix) :]
        if rel in dense:
            if not torch.equal(p, before[name]):
                problems.append(f"{name}, left dense ({dense[rel]}), changed")
        elif rel not in layers:
            problems.append(f"{name} {list(p.shape)} is neither pruned nor listed as dense")
    routers = _router_like(model, path, blocks)
    for rel in routers:
        if rel in layers:
            problems.append(
                f"{prefix}{rel} looks like a router (as wide as the experts) and was pruned"
            )
    err = report.totals.get("preflight", {}).get("replay_error")
    if err is None or err > REPLAY_TOL:
        problems.append(f"pre-flight replay error {err} (tolerance {REPLAY_TOL})")
    return problems


def _router_like(model, path, blocks) -> list[str]:
    """Block matrices whose name says gate or router and whose one side is the number of
    experts of an MoE config: what the sweep expects to be left dense."""
    cfg = model.config
    counts = {getattr(cfg, k, None) for k in _EXPERT_COUNTS}
    text = getattr(cfg, "get_text_config", lambda: cfg)()
    counts |= {getattr(text, k, None) for k in _EXPERT_COUNTS}
    counts = {c for c in counts if isinstance(c, int) and c > 1}
    out = []
    for i, b in enumerate(blocks):
        for name, p in b.named_parameters():
            leaf = name.rpartition(".")[0].rpartition(".")[2].lower()
            if p.dim() == 2 and ("gate" in leaf or "router" in leaf) and p.shape[0] in counts:
                out.append(f"{i}.{name}")
    return out


def prune_once(model, state, calib, spec) -> Result:
    """Prune `model` (reset to `state`) with `spec`; the outcome by the sweep's rules."""
    import fastprune as fp

    model.load_state_dict(state)
    before = copy.deepcopy(model.state_dict())
    try:
        report = fp.prune_model(model, calib, progress=False, **spec)
    except ValueError as e:
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        if changed:
            return Result("FAIL", f"refused ({_first_line(e)}) after changing {changed[:3]}")
        if not _raised_by_fastprune(e):
            return Result("FAIL", f"ValueError from outside fastprune: {_first_line(e)}")
        return Result("refused", _first_line(e).removeprefix("ValueError: "))
    except Exception as e:
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Result("FAIL", f"{_first_line(e)} at {Path(where.filename).name}:{where.lineno}")
    problems = _check_pruned(model, before, report, spec)
    res = Result("FAIL" if problems else "pruned", "; ".join(problems[:4]))
    res.dense = Counter(d["reason"] for d in report.dense)
    return res


def sweep_family(family: str) -> Outcome:
    """Build `family` tiny, check its plain forward, then prune it once per method."""
    out = Outcome(family)
    try:
        model = build(family)
        calib = calibration(model)
        with torch.no_grad():
            model(input_ids=calib[:1], use_cache=False)
    except Exception as e:
        out.built = _first_line(e)
        return out
    state = copy.deepcopy(model.state_dict())
    for label, spec in METHODS.items():
        out.results[label] = prune_once(model, state, calib, spec)
    return out


# ------------------------------------------------------------------------------- the table


def _short(reason: str) -> str:
    """A dense reason's kind, short: the part before its first parenthesis or colon."""
    return reason.split(" (")[0].split(":")[0]


def _row(o: Outcome) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "/").replace("\n", " ")

    if o.built is not None:
        return f"| {o.family} | no | | | | | {esc(o.built)} |"
    rs = [o.results.get(m) for m in METHODS]
    cells = [r.status if r is not None else "" for r in rs]
    seen = [r for r in rs if r is not None]
    notes = []
    for r in o.results.values():
        if r.detail and r.detail not in notes:
            notes.append(r.detail)
    if len(notes) == 1 and len({r.status for r in seen}) == 1:
        note = notes[0]
    else:
        note = "; ".join(f"{m}: {r.detail}" for m, r in o.results.items() if r.detail)
    dense = next((r.dense for r in seen if r.status == "pruned"), Counter())
    routers = sum(n for k, n in dense.items() if "router" in k)
    kinds = Counter()
    for k, n in dense.items():
        if "router" not in k:
            kinds[_short(k)] += n
    text = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
    return (
        f"| {o.family} | yes | {cells[0]} | {cells[1]} | {text} | {routers or ''} | {esc(note)} |"
    )


def table(outcomes: list[Outcome]) -> str:
    """The supported-families table (markdown), one row per family."""
    head = "| family | builds | " + " | ".join(METHODS) + " | left dense | routers | notes |"
    return "\n".join([head, "|---" * (len(METHODS) + 5) + "|", *map(_row, outcomes)])


def main(argv=None) -> list[Outcome]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", help="model types (default: every one)")
    ap.add_argument("--markdown", help="write the page with the table to this file")
    args = ap.parse_args(argv)
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.getLogger("fastprune").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give
    outcomes = []
    for fam in args.families or families():
        outcomes.append(sweep_family(fam))
        print(_row(outcomes[-1]), flush=True)
    if args.markdown:
        Path(args.markdown).write_text(page(outcomes, transformers.__version__))
    return outcomes


def page(outcomes: list[Outcome], version: str) -> str:
    built = [o for o in outcomes if o.built is None]
    pruned = [o for o in built if any(r.status == "pruned" for r in o.results.values())]
    return PAGE.format(
        version=version, total=len(outcomes), built=len(built), pruned=len(pruned),
        table=table(outcomes), layers=LAYERS, hidden=HIDDEN, experts=EXPERTS,
        nsamples=NSAMPLES, seqlen=SEQLEN,
    )  # fmt: skip


PAGE = """# Supported model families

Every model type of the causal-LM mapping of transformers {version}
(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), built tiny and random on the CPU ({layers} decoder
blocks, hidden size {hidden}, {experts} experts where it has experts; hybrid models keep one
block of each layer type) and pruned with SparseGPT at 50% and with Wanda 2:4 on
{nsamples} random samples of {seqlen} tokens. A family passes when one of these holds for
each method:

- **pruned**: every GEMM weight of its decoder blocks is at the target (50% zeros, or two
  zeros in each group of four inputs) except the matrices the report lists as left dense
  with a reason; those (routers among them) and every parameter outside the blocks are bit
  for bit what they were; and the pre-flight replay of each block on its captured arguments
  matches the real forward.
- **refused**: `prune_model` raises fastprune's `ValueError` naming the block, parameter and
  reason (the notes column), and the model's weights are bit for bit unchanged.

A family that cannot be built tiny, or whose tiny model does not run a forward, is listed
with the first line of the error. *left dense* counts the block matrices kept dense by a
rule, by kind (routers apart: found by name or, before any weight changes, by the pre-flight
as the linears feeding the expert top-k).

{total} families: {built} build tiny, {pruned} of them are pruned.
Regenerate (a few minutes on the CPU) with

    python -m benchmarks.families --markdown docs/families.md

`tests/test_families.py` runs the same sweep, one test per family.

{table}
"""


if __name__ == "__main__":
    main()
