"""Fused MoE experts in a compressed-tensors checkpoint. transformers keeps an MoE block's
experts as 3-D parameters (`mlp.experts.gate_up_proj [E, 2I, H]`) and saves them in the
checkpoint's own layout, one linear per expert and projection (`mlp.experts.3.gate_proj`,
Mixtral's `block_sparse_moe.experts.3.w1`), which is also the layout the compressed-tensors
format quantizes and transformers (dequantizing as it loads) and vLLM read. Each quantized
expert (`report.quantized["...experts.gate_up_proj[3]"]`, its own grids) is written as those
linears: its rows split as transformers splits the fused parameter, each part's codes, scales
and zero points those rows of the expert's (a grid belongs to one row, so a row split keeps
every grid whole). Experts stored transposed (`[E, in, out]`, gpt-oss) have no such layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..pipeline.experts import dense_experts as dense_experts  # noqa: F401
from ..pipeline.experts import fused_experts
from ..streaming.compressed import (  # noqa: F401  (importable from here too)
    dense_error,
    rows_of,
    savable_problem,
    split_expert,
)


@dataclass(frozen=True)
class ExpertParam:
    """One fused 3-D expert parameter: its module's name, the parameter (`proj`), its state
    key, its experts and whether it is stored transposed."""

    module: str
    proj: str
    num_experts: int
    transposed: bool

    @property
    def key(self) -> str:
        return f"{self.module}.{self.proj}"


def expert_params(model: nn.Module) -> list[ExpertParam]:
    """Every fused expert parameter of the model (none where experts are ordinary linears)."""
    out = []
    for name, module in model.named_modules():
        fx = fused_experts(module)
        if fx is not None:
            out.extend(ExpertParam(name, p, fx.num_experts, fx.transposed) for p in fx.projections)
    return out


def checkpoint_rows(model: nn.Module, p: ExpertParam, rows: int) -> list[list[tuple[str, slice]]]:
    """For each expert of `p` (`rows` output rows each), the checkpoint linears it is saved
    as and which of its rows each holds, read from transformers' own conversion of the fused
    parameter to the checkpoint layout (applied to the rows' indices)."""
    problem = savable_problem(None, p.transposed, p.key)
    if problem:
        raise ValueError(problem)
    from transformers.core_model_loading import revert_weight_conversion

    E = p.num_experts
    ids = torch.arange(E * rows * 2).reshape(E, rows, 2)  # two columns: a transpose shows
    out: list[list[tuple[str, slice]]] = [[] for _ in range(E)]
    for key, t in revert_weight_conversion(model, {p.key: ids}).items():
        t = t[0] if isinstance(t, list) else t
        ok = key.endswith(".weight") and t.dim() == 2 and t.shape[1] == 2 and len(t)
        ok = ok and torch.equal(t[:, 1], t[:, 0] + 1) and bool((t[:, 0] % 2 == 0).all())
        flat = t[:, 0] // 2 if ok else None
        e = int(flat[0]) // rows if ok else -1
        r0 = int(flat[0]) % rows if ok else 0
        want = torch.arange(r0, r0 + len(t)) + e * rows
        if not ok or r0 + len(t) > rows or not torch.equal(flat, want):
            raise ValueError(
                f"{p.key}: transformers saves it as {key} {list(t.shape)}, not whole rows of "
                "one expert, which a quantized checkpoint cannot hold"
            )
        out[e].append((key[: -len(".weight")], slice(r0, r0 + len(t))))
    if any(not parts for parts in out):
        raise ValueError(f"{p.key}: transformers saves no linear for some of its experts")
    return out


def expert_state(model: nn.Module, quantized: dict, state: dict, tensors_of):
    """The quantized experts' tensors in the checkpoint layout (`tensors_of(q)`: one linear's
    compressed tensors), their fused parameters taken out of `state`. Returns `(tensors,
    linears)`: the tensors and `{checkpoint linear: its quantized rows}`."""
    by_param: dict[str, dict[int, object]] = {}
    for name, q in quantized.items():
        split = split_expert(name)
        if split is not None:
            by_param.setdefault(split[0], {})[split[1]] = q
    tensors: dict[str, torch.Tensor] = {}
    linears: dict[str, object] = {}
    for p in expert_params(model):
        mine = by_param.pop(p.key, {})
        for q in mine.values():
            problem = savable_problem(q.spec, p.transposed, p.key)
            if problem:
                raise ValueError(problem)
        if p.transposed:
            continue  # none quantized: saved as it is, fused
        if len(mine) < p.num_experts:
            raise ValueError(dense_error(p.key))
        W = state.pop(p.key)
        layout = checkpoint_rows(model, p, W.shape[1])
        for e, parts in enumerate(layout):
            for lin, rows in parts:
                linears[lin] = rows_of(mine[e], rows)
                for k, t in tensors_of(linears[lin]).items():
                    tensors[f"{lin}.{k}"] = t
    if by_param:
        raise ValueError(f"{next(iter(by_param))} is not a fused expert parameter of the model")
    return tensors, linears
