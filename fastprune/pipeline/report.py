"""What `prune_model` did, per linear layer and in total: `LayerReport`, `PruneReport`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .block_layers import layer_kind_name


@dataclass
class LayerReport:
    name: str
    block: int
    shape: tuple[int, int]
    method: str
    sparsity: float
    loss: float | None
    seconds: float
    hessian: str | None  # the layer whose input H this layer shares (itself if none)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneReport:
    """What `prune_model` did: per linear layer and in total (`to_dict()` is JSON-ready)."""

    method: str
    sparsity: float
    pattern: str
    nsamples: int
    seqlen: int
    device: str
    seconds: float = 0.0
    achieved_sparsity: float = 0.0  # over the pruned layers
    block_sparsity: float = 0.0  # zeros over every matrix of the decoder blocks
    layers: list[LayerReport] = field(default_factory=list)
    dense: list[dict] = field(default_factory=list)  # matrices left dense: name, shape, reason
    totals: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # {full layer name: QuantizedWeight (on CPU)} of the quantized layers, for a quantized
        # checkpoint; not a field, so neither `asdict` nor `to_dict` copies its tensors
        self.quantized: dict[str, Any] = {}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [dict(asdict(lr), shape=list(lr.shape)) for lr in self.layers]
        return jsonable(d)

    def by_kind(self) -> list[dict]:
        """Aggregates per layer kind (`self_attn.q_proj`, `mlp.experts.down_proj` over all
        experts, ...), in first-seen order."""
        rows: dict[str, dict] = {}
        for lr in self.layers:
            r = rows.setdefault(
                _kind(lr.name),
                {"layers": 0, "params": 0, "pruned": 0.0, "loss": 0.0, "seconds": 0.0},
            )
            n = lr.shape[0] * lr.shape[1]
            r["layers"] += 1
            r["params"] += n
            r["pruned"] += lr.sparsity * n
            r["loss"] += lr.loss or 0.0
            r["seconds"] += lr.seconds
        for k, r in rows.items():
            r["kind"] = k
            r["sparsity"] = r.pop("pruned") / max(1, r["params"])
        return list(rows.values())

    def summary(self) -> str:
        """A short table per layer kind plus totals."""
        kinds = self.by_kind()
        w = max([24] + [len(r["kind"]) for r in kinds])
        lines = [
            f"{'layer kind':<{w}} {'n':>4} {'shape':>12} {'sparsity':>8} {'loss':>11} {'sec':>7}"
        ]
        shapes = {}
        for lr in self.layers:
            shapes.setdefault(_kind(lr.name), f"{lr.shape[0]}x{lr.shape[1]}")
        for r in kinds:
            lines.append(
                f"{r['kind']:<{w}} {r['layers']:>4} {shapes.get(r['kind'], ''):>12} "
                f"{r['sparsity']:>8.4f} {r['loss']:>11.4g} {r['seconds']:>7.2f}"
            )
        t = self.totals
        lines.append(
            f"{self.method} {self.pattern} target sparsity {self.sparsity:.2f}: achieved "
            f"{self.achieved_sparsity:.4f} over {t.get('params', 0):,} weights in "
            f"{len(self.layers)} layers ({self.block_sparsity:.4f} over all "
            f"{t.get('block_params', 0):,} matrix entries of the blocks); "
            f"{self.seconds:.1f}s on {self.device} "
            f"(solve {t.get('solve_seconds', 0):.1f}s, forward {t.get('forward_seconds', 0):.1f}s"
            + (f", gradients {t['gradient_seconds']:.1f}s" if "gradient_seconds" in t else "")
            + ")"
        )
        lines.extend(self._recipe_lines())
        lines.extend(self._quant_lines())
        lines.extend(self._dense_lines())
        lines.extend(self._expert_lines())
        if t.get("hessian_seconds"):
            lines.append(
                f"time: capture {t.get('capture_seconds', 0):.1f}s, forwards with Hessians "
                f"{t['hessian_seconds']:.1f}s, propagation {t.get('propagate_seconds', 0):.1f}s, "
                f"shared inverses {t.get('inverse_seconds', 0):.1f}s, solves "
                f"{t.get('solve_seconds', 0):.1f}s"
            )
        if "world_size" in t:

            def per_rank(key: str) -> str:
                return "/".join(f"{x:.1f}" for x in t.get(key, []))

            lines.append(
                f"distributed: {t['world_size']} ranks ({t.get('backend')}); seconds per rank: "
                f"calibration {per_rank('rank_calibration_seconds')}, solves "
                f"{per_rank('rank_solve_seconds')}, in collectives "
                f"{per_rank('rank_comm_seconds')}; {t['communicated_bytes'] / 2**20:.1f} MiB "
                f"communicated ({t.get('reduced_bytes', 0) / 2**20:.1f} MiB reduced, "
                f"{t.get('broadcast_bytes', 0) / 2**20:.1f} MiB weights broadcast)"
            )
        kernels = self.kernels()
        if kernels:
            lines.append("kernels: " + ", ".join(f"{op}={impl}" for op, impl in kernels.items()))
        return "\n".join(lines)

    def _recipe_lines(self) -> list[str]:
        """For a composition: its steps, and what the least-squares refit did."""
        infos = [lr.info for lr in self.layers if "recipe" in lr.info]
        if not infos:
            return []
        steps = {
            k: "/".join(sorted({str(i["recipe"].get(k)) for i in infos}))
            for k in ("select", "refine", "reconstruct")
        }
        line = f"recipe: select {steps['select']}, refine {steps['refine']}, "
        line += f"reconstruct {steps['reconstruct']}"
        refits = [i for i in infos if "refit_iters" in i]
        if refits:  # a row-split layer's parts are merged: iterations and residual the
            # largest, losses summed (`merge_part_reports`)
            after = sum(lr.loss or 0.0 for lr in self.layers if "refit_iters" in lr.info)
            line += (
                f"; least-squares refit on {len(refits)} layers: at most "
                f"{max(i['refit_iters'] for i in refits)} CG iterations, largest residual "
                f"left {max(i['refit_residual'] for i in refits):.1e}, layer loss "
                f"{sum(i['loss_before_refit'] for i in refits):.4g} -> {after:.4g}"
            )
        return [line]

    def _quant_lines(self) -> list[str]:
        """For a quantized prune: the grid, its rounding error and the bytes on disk."""
        q = self.totals.get("quant")
        if not q:
            return []
        group = "per channel" if q["group_size"] is None else f"groups of {q['group_size']}"
        grid = "fp8 e4m3" if q["format"] == "fp8" else f"int{q['bits']}"
        return [
            f"quant: {grid} {group}{'' if q['sym'] else ' asymmetric'}"
            f"{' act-order' if q['actorder'] else ''} on {q['layers']} layers; grid error "
            f"{q['grid_error']:.3g} (mean relative); {q['bytes'] / 2**20:.2f} MiB packed on "
            f"disk ({q['bytes'] / max(1, q['bf16_bytes']):.3f}x their bf16 bytes)"
        ]

    def _dense_lines(self) -> list[str]:
        """What stayed dense, grouped by matrix kind and reason."""
        groups: dict[tuple[str, str], list] = {}
        for d in self.dense:
            g = groups.setdefault((_kind(d["name"]), d["reason"]), [0, 0])
            g[0] += 1
            g[1] += math.prod(d["shape"])
        if not groups:
            return []
        parts = [f"{k} x{c} ({why}, {n:,} weights)" for (k, why), (c, n) in groups.items()]
        return ["left dense: " + "; ".join(parts)]

    def _expert_lines(self) -> list[str]:
        """Calibration tokens per expert layer kind: min / median / max, and experts without."""
        per: dict[str, list[int]] = {}
        for lr in self.layers:
            if "tokens" in lr.info:
                per.setdefault(_kind(lr.name), []).append(int(lr.info["tokens"]))
        lines = []
        for k, ts in per.items():
            ts = sorted(ts)
            none = sum(1 for t in ts if t == 0)
            lines.append(
                f"experts {k}: {len(ts)} layers, calibration tokens per expert min {ts[0]} / "
                f"median {ts[len(ts) // 2]} / max {ts[-1]}"
                + (f"; {none} without tokens (pruned with H = I)" if none else "")
            )
        if lines:
            lines[0] += f" [moe_calibration={self.totals.get('moe_calibration', 'routed')}]"
        return lines

    def kernels(self) -> dict[str, str]:
        """{op: implementations that ran it in any layer} (from each layer's info)."""
        seen: dict[str, list[str]] = {}
        for lr in self.layers:
            for op, impl in (lr.info.get("kernels") or {}).items():
                names = seen.setdefault(op, [])
                names.extend(n for n in impl.split("+") if n not in names)
        return {op: "+".join(names) for op, names in seen.items()}


def quant_totals(layers: list[LayerReport]) -> dict | None:
    """The quantized layers' grid (of the first; a prune has one), their mean grid error, the
    bytes they take packed on disk and as bf16; None when no layer was quantized."""
    qs = [(lr, lr.info["quant"]) for lr in layers if isinstance(lr.info.get("quant"), dict)]
    if not qs:
        return None
    first = qs[0][1]
    errors = [q["grid_error"] for _, q in qs if isinstance(q.get("grid_error"), float)]
    out = {k: first.get(k) for k in ("format", "bits", "group_size", "sym", "actorder", "params")}
    out.update(
        layers=len(qs),
        grid_error=sum(errors) / len(errors) if errors else float("nan"),
        bytes=sum(int(q.get("bytes", 0)) for _, q in qs),
        bf16_bytes=sum(2 * lr.shape[0] * lr.shape[1] for lr, _ in qs),
    )
    return out


def _kind(name: str) -> str:
    """A report name (`3.mlp.experts.down_proj[7]`) without block and expert index."""
    return layer_kind_name(name.split(".", 1)[1] if "." in name else name)


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= 16 else f"tensor{tuple(x.shape)}"
    if isinstance(x, torch.dtype | torch.device):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)
