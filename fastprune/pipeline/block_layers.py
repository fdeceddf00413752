"""What the pipeline does with every matrix of a decoder block: prune it, or leave it dense
for a stated reason. Nothing with two or more dimensions is skipped silently.

The layers pruned are linears (and GPT-2's Conv1D) and, in MoE blocks, each expert's slice of
a fused 3-D expert parameter (`mlp.experts.gate_up_proj[3]`, see `fastprune.pipeline.experts`). Left
dense by rule: routers (`mlp.gate`, `mlp.router`, Qwen2-MoE's `shared_expert_gate`) and
per-expert bias tables; left dense by the user: whatever `ignore` matches or `targets` does
not. A matrix no rule covers is an error that names it and the `ignore` pattern that would
leave it dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import ExpertProjection, is_prunable
from ..validation import check_patterns as patterns
from ..validation import matches
from .experts import expert_list_parent, fused_experts

_INDEXED = re.compile(r"^(.*)\.([A-Za-z_0-9]+)\[(\d+)\]$")


def router_reason(block: nn.Module, path: str, module: nn.Module) -> str | None:
    """Why `module` (at `path` in `block`) is an MoE router, never pruned by default; None if
    it is not one: a `shared_expert_gate`, a module whose class is a router, or a `gate` /
    `router` beside an `experts` module. Routers under other names are found by structure
    before any weight changes (`fastprune.pipeline.preflight`: linears feeding the top-k)."""
    parent_path, _, leaf = path.rpartition(".")
    if leaf == "shared_expert_gate":
        return "shared-expert gate (a router)"
    # the module, or a module it sits in (JetMoE's `router.layer` inside its top-k gating),
    # is a router by its class or its name
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        owner = block.get_submodule(".".join(parts[:i]))
        kind = type(owner).__name__.lower()
        if "router" in kind or "gating" in kind or parts[i - 1] in ("router", "router_gate"):
            return "router"
    if leaf in ("gate", "router"):
        parent = block.get_submodule(parent_path) if parent_path else block
        if hasattr(parent, "experts"):
            return "router"
    return None


# Parameters of a block that are not GEMM weights, left dense by these rules (in this order);
# each reason is a kind the report counts. A parameter none of them covers, that is no linear,
# expert projection nor router, is an error naming it.
CONV_KERNEL = "convolution kernel (conv/SSM mixer, not a GEMM)"
SSM_STATE = "SSM state parameters (A_log, D, dt)"
NORM_SCALE = "norm or clip scales"
TABLE = "embedding or position-bias table"
VECTOR = "per-channel vector stored with singleton dimensions"
MIXING = "small mixing matrix (hyper-connections, gates): at most 32 rows"
UNREAD_EXPERTS = "expert weights in a layout fastprune does not read"
_SSM_NAMES = ("A_log", "A", "D", "dt_bias", "dt")
MIXING_MAX_ROWS = 32


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def non_gemm_reason(owner: nn.Module | None, leaf: str, p: torch.Tensor) -> str | None:
    """Why parameter `leaf` of module `owner` (None: not found) is no GEMM weight, or None:
    convolution kernels (depthwise or with a receptive field), SSM state, norm scales,
    embedding/bias tables, vectors stored as 2-D+, small mixing matrices and the stacks of an
    experts module in a layout no rule reads (any other unknown stack is an error)."""
    if isinstance(owner, nn.modules.conv._ConvNd) and leaf == "weight":
        if owner.groups > 1 or any(k > 1 for k in owner.kernel_size):
            return CONV_KERNEL
        return None  # a pointwise convolution is a GEMM: no rule leaves it dense
    if leaf in _SSM_NAMES:
        return SSM_STATE
    if (owner is not None and _is_norm(owner)) or leaf in ("scale", "scales"):
        return NORM_SCALE
    if isinstance(owner, nn.Embedding | nn.EmbeddingBag) or (
        "bias" in leaf.lower() and not isinstance(owner, nn.Linear)
    ):
        return TABLE
    if p.numel() == max(p.shape):  # every dimension but one is 1
        return VECTOR
    if p.dim() == 2 and min(p.shape) <= MIXING_MAX_ROWS:
        return MIXING
    if (
        owner is not None
        and not isinstance(owner, nn.Linear)
        and "expert" in type(owner).__name__.lower()
    ):  # an experts module's stack: JetMoE's ParallelExperts [E, out, in], DBRX's [E*I, H]
        return UNREAD_EXPERTS
    return None


@dataclass
class DenseMatrix:
    name: str  # the parameter, relative to the block (`mlp.gate.weight`)
    shape: tuple[int, ...]
    reason: str


@dataclass
class BlockLayers:
    """One decoder block's layers to prune (name -> nn.Module or `ExpertProjection`, in
    module order) and every other matrix of the block with the reason it stays dense."""

    layers: dict[str, object] = field(default_factory=dict)
    dense: list[DenseMatrix] = field(default_factory=list)
    # linears inside an nn.ModuleList of experts -> that list's path (called on routed tokens)
    expert_lists: dict[str, str] = field(default_factory=dict)

    def is_expert(self, name: str) -> bool:
        return name in self.expert_lists or isinstance(self.layers.get(name), ExpertProjection)


@dataclass
class _Candidate:
    name: str  # what targets / ignore match: `self_attn.q_proj`, `mlp.experts.gate_up_proj`
    params: tuple[str, ...]  # the block parameters it covers
    layers: dict[str, object]


def _survey(block: nn.Module):
    """(candidates to prune, {param: dense reason} by rule, every matrix {param: shape})."""
    matrices = {n: tuple(p.shape) for n, p in block.named_parameters() if p.dim() >= 2}
    cands: list[_Candidate] = []
    ruled: dict[str, str] = {}
    for path, mod in block.named_modules():
        if not path:
            continue
        why = router_reason(block, path, mod)
        if why is not None:
            for pn, p in mod.named_parameters():
                if p.dim() >= 2:
                    ruled[f"{path}.{pn}"] = why
            continue
        fx = fused_experts(mod)
        if fx is not None:
            for proj in fx.projections:
                name = f"{path}.{proj}"
                layers = {
                    f"{name}[{e}]": ExpertProjection(fx, proj, e) for e in range(fx.num_experts)
                }
                cands.append(_Candidate(name, (name,), layers))
                if fx.bias(proj) is not None and fx.bias(proj).dim() >= 2:
                    ruled[f"{name}_bias"] = "expert biases"
            continue
        if is_prunable(mod):
            cands.append(_Candidate(path, (f"{path}.weight",), {path: mod}))
    # a router's own parameters are not also a linear candidate
    cands = [c for c in cands if not any(p in ruled for p in c.params)]
    covered = {q for c in cands for q in c.params} | set(ruled)
    params = dict(block.named_parameters())
    for name in matrices:
        if name not in covered:
            owner_path, _, leaf = name.rpartition(".")
            owner = block.get_submodule(owner_path) if owner_path else block
            why = non_gemm_reason(owner, leaf, params[name])
            if why is not None:
                ruled[name] = why
    return cands, ruled, matrices


def _names(block: nn.Module) -> list[str]:
    """Every name `targets` / `ignore` can match in `block`."""
    cands, ruled, matrices = _survey(block)
    covered = {p for c in cands for p in c.params} | set(ruled)
    out = [c.name for c in cands]
    for p in matrices:
        if p not in covered:
            out.extend([p, p.rpartition(".")[0]])
    return out


def find_block_layers(
    block: nn.Module, targets=None, ignore=None, where: str = "block"
) -> BlockLayers:
    """Account for every matrix of `block`: the layers to prune and the rest left dense with
    its reason. `targets` / `ignore`: glob patterns on names relative to the block
    (`self_attn.q_proj`, `mlp.experts.down_proj`) or their last part (`q_proj`). A matrix
    that is neither a layer nor covered by a rule nor ignored raises `ValueError` naming it
    (`where` says which block)."""
    targets = patterns(targets, "targets")
    ignore = patterns(ignore, "ignore")
    cands, ruled, matrices = _survey(block)
    out = BlockLayers()
    covered: set[str] = set()
    for c in cands:
        covered.update(c.params)
        reason = None
        if ignore is not None and matches(ignore, c.name):
            reason = "ignored (ignore=)"
        elif targets is not None and not matches(targets, c.name):
            reason = "not in targets="
        if reason is not None:
            out.dense.extend(DenseMatrix(p, matrices[p], reason) for p in c.params)
            continue
        out.layers.update(c.layers)
        for name in c.layers:
            parent = expert_list_parent(name)
            if parent is not None:
                out.expert_lists[name] = parent
    for p, why in ruled.items():
        if p in matrices:
            covered.add(p)
            out.dense.append(DenseMatrix(p, matrices[p], why))
    for p, shape in matrices.items():
        if p in covered:
            continue
        owner = p.rpartition(".")[0]
        if ignore is not None and (matches(ignore, p) or (owner and matches(ignore, owner))):
            out.dense.append(DenseMatrix(p, shape, "ignored (ignore=)"))
            continue
        raise ValueError(
            f"{where}: parameter {p} {list(shape)} is neither a linear layer, an expert "
            f"projection nor a router, and fastprune has no rule for it; leave it dense with "
            f"ignore=['{p}'] (--ignore {p})"
        )
    return out


def shared_modules(blocks, layouts) -> list[dict[str, list[str]]]:
    """Per block: {planned layer, or "" for the block itself: the other places (`block
    j.path`, `path` within the block) where the same module object sits}."""
    places: dict[int, list[tuple[int, str]]] = {}
    for i, block in enumerate(blocks):
        for path, mod in block.named_modules(remove_duplicate=False):
            places.setdefault(id(mod), []).append((i, path))
    out: list[dict[str, list[str]]] = [{} for _ in blocks]
    for i, (block, bl) in enumerate(zip(blocks, layouts)):
        named = dict(block.named_modules())
        for name in ["", *bl.layers]:
            mod = block if name == "" else named.get(name)
            where = places.get(id(mod), []) if mod is not None else []
            others = [f"block {j}" + (f".{p}" if p else "") if j != i else p
                      for j, p in where if (j, p) != (i, name)]  # fmt: skip
            if others:
                out[i][name] = others
    return out


def check_selection(blocks: nn.ModuleList, targets=None, ignore=None) -> None:
    """Every `targets` / `ignore` pattern must match some layer or matrix of some block
    (typo protection)."""
    names = sorted({n for b in blocks for n in _names(b)})
    for arg, value in (("targets", targets), ("ignore", ignore)):
        for p in patterns(value, arg) or []:
            if not any(matches([p], n) for n in names):
                raise ValueError(
                    f"{arg} pattern {p!r} matches no layer of the blocks; they are: "
                    f"{', '.join(names)}"
                )


def resolve_layer(block: nn.Module, rel: str):
    """The layer a report names inside `block`: a module (`self_attn.q_proj`) or an expert's
    slice of a fused parameter (`mlp.experts.gate_up_proj[3]`)."""
    m = _INDEXED.match(rel)
    if m is None:
        return block.get_submodule(rel)
    path, proj, e = m.group(1), m.group(2), int(m.group(3))
    fx = fused_experts(block.get_submodule(path))
    if fx is None or proj not in fx.projections or not 0 <= e < fx.num_experts:
        raise ValueError(f"{rel}: no such expert projection in the block")
    return ExpertProjection(fx, proj, e)


def layer_kind_name(rel: str) -> str:
    """A layer's name without its expert index: what the report groups by."""
    m = _INDEXED.match(rel)
    return rel if m is None else f"{m.group(1)}.{m.group(2)}"


@torch.no_grad()
def count_block_zeros(blocks: nn.ModuleList) -> tuple[int, int]:
    """(zeros, entries) over every matrix (parameter with 2+ dimensions) of the blocks."""
    zeros = total = 0
    for b in blocks:
        for p in b.parameters():
            if p.dim() >= 2:
                zeros += p.numel() - torch.count_nonzero(p).item()
                total += p.numel()
    return zeros, total
