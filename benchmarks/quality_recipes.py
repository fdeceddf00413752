"""Perplexity of every peer method and of fastprune's recipes on the built-in model, over
several calibration samples and texts of three domains.

SmolLM2-135M (built in), 32x512 calibration windows of the built-in text drawn with each seed
of `--seeds` (one calibration sample per seed), perplexity on three texts the calibration
never saw: the built-in evaluation text (CPython's help topics, held out: technical prose),
the GNU GPL version 3 (legal prose; Debian ships it in `/usr/share/common-licenses/GPL-3`)
and Python source code (the standard library's own `argparse.py`, which ships with every
Python); `--texts` names others. Every configuration prunes a fresh copy of the dense
weights; its prune seconds are `PruneReport.seconds` (calibration forwards, Hessians,
gradients, solves). Rows are appended to `OUT.jsonl` as they finish, keyed by (configuration,
pattern, seed), so an interrupted run resumes where it stopped (`--rerun` runs finished rows
again; the tables keep the last row of each key). `--table` writes `OUT.json`, `OUT.csv` and
`OUT.md`: per pattern and text, the mean and sample standard deviation over the seeds, and
how the recipe compares with the best peer seed by seed: the paired differences, their mean
and its 95% Student-t interval (also in `OUT.summary.json`); `--peers` names the peers.

    python -m benchmarks.quality_recipes --configs peers,fastprune --patterns 2:4,50%
    python -m benchmarks.quality_recipes --table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import transformers

import fastprune as fp
from benchmarks.admm_lever import register_admm
from benchmarks.harness import device_name, versions, write_rows
from fastprune.data import get_calibration, read_text_file, sample_windows, text_for, tokenize
from fastprune.evaluate import perplexity

OUT = "benchmarks/results/quality_seeds_smollm2_cpu"
# name -> text ("builtin": the held-out built-in text; else a file path)
TEXTS = {
    "builtin": "builtin",
    "gpl3": "/usr/share/common-licenses/GPL-3",
    "code": argparse.__file__,
}
RECIPE = "fastprune"

# label -> prune_model keyword arguments (besides calibration, sparsity and pattern)
PEERS = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "gblm": {"method": "gblm"},
    "sparsegpt": {"method": "sparsegpt"},
    "rose": {"method": "rose"},
    # ROSE as its repository publishes it: the running scaler in the pre-pruning score
    "rose-published": {"method": "rose", "score_scaler": "running"},
    "sparseswaps": {"method": "sparseswaps"},
}
# the recipe's definition before the least-squares reconstruction: the selector's weights
# refined by swap steps on them, then the better of that and an OBS reconstruction; the rows
# named `fastprune-obs` ran as "fastprune" while this was its definition (`ran_as`), and the
# `fastprune-obs+...` candidates as "fastprune+..."
OBS_RECIPE = {"method": "fastprune", "refine": "sparseswaps", "reconstruct": "best"}
COMBOS = {
    "fastprune": {"method": "fastprune"},
    "fastprune-obs": OBS_RECIPE,
    # SparseSwaps (Wanda's mask, swaps within its budget) + fastprune's OBS reconstruction
    "sparseswaps+rec": {"method": "sparseswaps", "reconstruct": True},
    "sparsegpt+swaps+best": {
        "method": "sparsegpt", "refine": "sparseswaps", "reconstruct": "best",
    },
    "sparsegpt+owl": {"method": "sparsegpt", "allocation": "owl"},
    "fastprune-obs+owl": {**OBS_RECIPE, "allocation": "owl"},
    "rose+swaps+best": {"method": "rose", "refine": "sparseswaps", "reconstruct": "best"},
    "rose+swaps4+best": {
        "method": "rose", "refine": "sparseswaps", "reconstruct": "best", "max_swaps": 4,
    },
    "rose+swaps16+best": {
        "method": "rose", "refine": "sparseswaps", "reconstruct": "best", "max_swaps": 16,
    },
    "sparsegpt+swaps4+best": {
        "method": "sparsegpt", "refine": "sparseswaps", "reconstruct": "best", "max_swaps": 4,
    },
    "sparsegpt+swaps16+best": {
        "method": "sparsegpt", "refine": "sparseswaps", "reconstruct": "best", "max_swaps": 16,
    },
    "sparsegpt+swaps(orig)+rec": {
        "method": "sparsegpt", "refine": "sparseswaps", "refine_on": "original",
        "reconstruct": True,
    },
    "wanda+swaps+rec": {"method": "wanda", "refine": "sparseswaps", "reconstruct": True},
    # regularised reconstruction: more damping shrinks the OBS updates toward the kept weights
    "fastprune-obs+damp0.05": {**OBS_RECIPE, "percdamp": 0.05},
    "fastprune-obs+damp0.1": {**OBS_RECIPE, "percdamp": 0.1},
    # the swaps without a final reconstruction
    "fastprune-rec": {**OBS_RECIPE, "reconstruct": False},
    # the least-squares reconstruction after the swaps (the recipe is it without them)
    "fastprune+swaps": {"method": "fastprune", "refine": "sparseswaps"},
    # asymmetric calibration: every layer fitted to the dense model's outputs
    "fastprune-obs+asym": {**OBS_RECIPE, "asymmetric": True},
    "sparsegpt+asym": {"method": "sparsegpt", "asymmetric": True},
    "rose+asym": {"method": "rose", "asymmetric": True},
    # levers on the recipe at 50%: ROSE's mask (its repository's running scaler, or diag(H)/2)
    # with the least-squares refit; swaps and refits alternated; fewer CG iterations (the
    # refit stopped early, nearer its OBS start); more damping (the refit pulled toward W),
    # or the damping chosen per layer on held-out windows; calibration from three domains
    "rose-published+lstsq": {"method": "rose", "score_scaler": "running", "reconstruct": "lstsq"},
    "rose+lstsq": {"method": "rose", "reconstruct": "lstsq"},
    "fastprune+swaps+rounds3": {"method": "fastprune", "refine": "sparseswaps", "rounds": 3},
    "fastprune+iters4": {"method": "fastprune", "refit_iters": 4},
    "fastprune+iters8": {"method": "fastprune", "refit_iters": 8},
    "fastprune+damp0.05": {"method": "fastprune", "percdamp": 0.05},
    "fastprune+damp0.2": {"method": "fastprune", "percdamp": 0.2},
    "fastprune+mixed": {"method": "fastprune", "calibration": "mixed"},
    # the damping chosen per layer on a held-out quarter of the calibration windows
    "fastprune+held-out": {"method": "fastprune", "damping_levels": (0.01, 0.05, 0.1)},
    "sparsegpt+mixed": {"method": "sparsegpt", "calibration": "mixed"},
    # ADMM's mask (benchmarks/admm_lever.py) with the least-squares refit
    "admm": {"method": "admm"},
}  # fmt: skip
# calibration="mixed": the windows drawn from three domains, none of them an evaluation text:
# the built-in calibration text (technical prose), Python source of standard-library modules
# other than argparse, and licences Debian ships other than the GPL family (legal prose)
MIXED_CODE = ("typing", "dataclasses", "functools", "subprocess", "collections", "enum")
MIXED_LEGAL = ("Apache-2.0", "MPL-2.0", "Artistic", "BSD")


def mixed_calibration(tok, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows: a third (rounded up) from the built-in calibration text, a third
    each from `MIXED_CODE`'s sources and `MIXED_LEGAL`'s licences, each drawn with `seed`."""
    import importlib

    code = "\n\n".join(
        Path(importlib.import_module(m).__file__).read_text(encoding="utf-8") for m in MIXED_CODE
    )
    legal = "\n\n".join(read_text_file(f"/usr/share/common-licenses/{n}") for n in MIXED_LEGAL)
    k = nsamples // 3
    parts = [
        get_calibration("builtin", tok, nsamples - 2 * k, seqlen, seed),
        sample_windows(tokenize(tok, code), k, seqlen, seed),
        sample_windows(tokenize(tok, legal), k, seqlen, seed),
    ]
    return torch.cat([p for p in parts if p.numel()])


# quantized: at pattern 0% the grid alone (round-to-nearest, no Hessian; GPTQ; the restated
# IST-DASLab GPTQ loop), else prune and quantize: in one sweep (the joint mode: SparseGPT's
# `--wbits`, ROSE's sweep rounding as it prunes), the recipe (its mask, the least-squares
# refit, then GPTQ on the fixed mask from the refitted weights), or in two passes ("then":
# a second prune_model run on the pruned model, GPTQ keeping its zeros, with Hessians of the
# pruned model: what llm-compressor users run, with the sparsity kept)
GPTQ_PASS = {"method": "gptq", "sparsity": 0.0, "keep_zeros": True}
QUANT = {
    "rtn-w4a16": {"method": "magnitude", "rtn": "w4a16"},
    "gptq-w4a16": {"method": "gptq", "quant": "w4a16"},
    "gptq-reference-w4a16": {"method": "gptq-reference", "quant": "w4a16"},
    "sparsegpt+w4a16": {"method": "sparsegpt", "quant": "w4a16"},
    "rose+w4a16": {"method": "rose", "quant": "w4a16"},
    "fastprune+w4a16": {"method": "fastprune", "quant": "w4a16"},
    "sparsegpt>gptq-w4a16": {"method": "sparsegpt", "then": {**GPTQ_PASS, "quant": "w4a16"}},
    "fastprune>gptq-w4a16": {"method": "fastprune", "then": {**GPTQ_PASS, "quant": "w4a16"}},
    "sparsegpt+fp8": {"method": "sparsegpt", "quant": "fp8"},
    "rose+fp8": {"method": "rose", "quant": "fp8"},
    "fastprune+fp8": {"method": "fastprune", "quant": "fp8"},
    "sparsegpt>gptq-fp8": {"method": "sparsegpt", "then": {**GPTQ_PASS, "quant": "fp8"}},
    "fastprune>gptq-fp8": {"method": "fastprune", "then": {**GPTQ_PASS, "quant": "fp8"}},
}
GROUPS = {"peers": PEERS, "combos": COMBOS, "quant": QUANT}


class _Rounded:
    """What `round_blocks_to_nearest` reports in place of a `PruneReport`."""

    def __init__(self, seconds: float):
        self.seconds, self.totals, self.achieved_sparsity = seconds, {}, 0.0


def round_blocks_to_nearest(model, spec) -> _Rounded:
    """Every linear of the decoder blocks rounded to `spec`'s grid, no Hessian (the RTN
    baseline that GPTQ is measured against)."""
    from fastprune.models import find_blocks, find_linears, get_weight, set_weight

    t0 = time.perf_counter()
    for block in find_blocks(model)[1]:
        for mod in find_linears(block).values():
            W = get_weight(mod)
            set_weight(mod, fp.round_to_nearest(W.float(), spec).dequantize().to(W.dtype))
    return _Rounded(time.perf_counter() - t0)


def reference_gptq(W, H, sparsity=0.0, prune_n=0, prune_m=0, *, quant="w4a16", **_):
    """The restated IST-DASLab GPTQ loop (`fastprune.original.original_gptq`, float32,
    blocks of 128 columns) as a layer solver, its grids and codes as a `QuantizedWeight`."""
    from fastprune.hessian import layer_loss
    from fastprune.original import original_gptq
    from fastprune.quant import QuantizedWeight, as_spec

    spec = as_spec(quant)
    Q, scale, zero, g = original_gptq(
        W.float(), H.float(), spec.bits, spec.group_size or -1, spec.sym, spec.actorder
    )
    g = g.long()
    codes = (torch.round(Q / scale[:, g]) + zero[:, g]).clamp(0, 2**spec.bits - 1)
    qw = QuantizedWeight(
        spec, codes.to(torch.uint8), scale.float(), zero.to(torch.int32),
        g.to(torch.int32) if spec.actorder and spec.group_size else None,
    )  # fmt: skip
    weight = qw.dequantize()
    mask = torch.ones(W.shape, dtype=torch.bool, device=W.device)
    info = {"method": "gptq-reference", "quant": {"grid_error": 0.0}}
    return fp.PruneResult(weight.to(W.dtype), mask, layer_loss(W, weight, H), info, qw)


def register_reference() -> None:
    """Method "gptq-reference" (the restated reference loop), once."""
    from fastprune.solvers.registry import Method, register

    if "gptq-reference" not in fp.METHODS:
        register(
            Method(
                "gptq-reference",
                reference_gptq,
                "the restated IST-DASLab GPTQ loop",
                takes_quant=True,
                prunes=False,
            )  # fmt: skip
        )


def pattern_args(p: str) -> dict:
    if p.endswith("%"):
        return {"sparsity": float(p[:-1]) / 100, "prune_n": 0, "prune_m": 0}
    n, m = (int(x) for x in p.split(":"))
    return {"sparsity": n / m, "prune_n": n, "prune_m": m}


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key(row: dict) -> tuple:
    return row["config"], row["pattern"], row.get("seed", 0)


def parse_texts(spec: str) -> dict[str, str]:
    """`name=path,name=path` (a bare known name takes its default path)."""
    out = {}
    for item in spec.split(","):
        name, _, path = item.partition("=")
        if not path and name not in TEXTS:
            raise SystemExit(f"text {name!r} needs a path (name=path); known: {', '.join(TEXTS)}")
        out[name] = path or TEXTS[name]
    return out


def pick_configs(spec: str) -> dict[str, dict]:
    configs = {}
    for name in spec.split(","):
        if name in GROUPS:
            configs.update(GROUPS[name])
        elif name in PEERS or name in COMBOS or name in QUANT:
            configs[name] = {**PEERS, **COMBOS, **QUANT}[name]
        else:
            known = ", ".join([*GROUPS, *PEERS, *COMBOS, *QUANT])
            raise SystemExit(f"unknown config {name!r}; known: {known}")
    return configs


def run(args) -> None:
    jsonl = Path(args.out + ".jsonl")
    done = {key(r) for r in load_rows(jsonl)}
    configs = pick_configs(args.configs)
    seeds = [int(x) for x in args.seeds.split(",")]
    # pattern by pattern, then seed by seed: every finished (pattern, seed) is a comparison
    todo = [
        (c, p, sd)
        for p in args.patterns.split(",")
        for sd in seeds
        for c in configs
        if args.rerun or (c, p, sd) not in done
    ]
    if not todo and ("dense", "-", "-") in done:
        print("nothing to do")
        return
    register_reference()
    register_admm()
    torch.manual_seed(0)
    model, tok = fp.load_model(args.model)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    texts = {
        name: tokenize(tok, text_for("builtin", "eval") if path == "builtin" else
                       read_text_file(path, "eval"))
        for name, path in parse_texts(args.texts).items()
    }  # fmt: skip
    calib = {}

    def evaluate() -> dict:
        return {
            f"ppl_{k}": round(
                perplexity(model, ids, args.seqlen, max_windows=args.eval_windows)["ppl"], 4
            )
            for k, ids in texts.items()
        }

    common = {
        "model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "eval_windows": args.eval_windows, "texts": parse_texts(args.texts),
        "eval_tokens": {k: int(v.numel()) for k, v in texts.items()},
        "device": device_name("cpu"), **versions(), "transformers": transformers.__version__,
    }  # fmt: skip
    with jsonl.open("a") as f:
        if ("dense", "-", "-") not in done:
            row = {"config": "dense", "pattern": "-", "seed": "-", **evaluate(), **common}
            f.write(json.dumps(row) + "\n")
            f.flush()
        for config, pat, seed in todo:
            model.load_state_dict(dense)
            kw = dict(configs[config])
            then = kw.pop("then", None)
            source = kw.pop("calibration", "builtin")
            if (source, seed) not in calib:
                calib[source, seed] = (
                    mixed_calibration(tok, args.nsamples, args.seqlen, seed)
                    if source == "mixed"
                    else get_calibration(source, tok, args.nsamples, args.seqlen, seed)
                )
            ids = calib[source, seed]
            t0 = time.perf_counter()
            if "rtn" in kw:
                rep = round_blocks_to_nearest(model, fp.QuantSpec.preset(kw["rtn"]))
            else:
                rep = fp.prune_model(
                    model, ids, **pattern_args(pat), seed=seed,
                    progress=not args.no_progress, **kw,
                )  # fmt: skip
            if then is not None:  # the second pass on the pruned model
                second = fp.prune_model(
                    model, ids, seed=seed, progress=not args.no_progress, **then
                )
                rep.seconds += second.seconds
                rep.totals = {**rep.totals, "loss_second_pass": second.totals.get("loss")}
                kw["then"] = then
            wall = time.perf_counter() - t0
            row = {
                "config": config,
                "pattern": pat,
                "seed": seed,
                **evaluate(),
                "prune_s": round(rep.seconds, 1),
                "wall_s": round(wall, 1),
                "loss": rep.totals.get("loss"),
                "achieved_sparsity": round(rep.achieved_sparsity, 5),
                "options": {k: v for k, v in kw.items() if k != "method"},
                **({"calibration": source} if source != "builtin" else {}),
                "method": kw["method"],
                **common,
            }
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
            f.flush()


# two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30 (beyond: `t_quantile_975`'s
# Cornish-Fisher series, within 1e-6 of the exact value there)
T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
Z975 = 1.959963984540054  # the normal quantile the series starts from


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the half-width factor of a two-sided 95% Student-t interval. The table
    `T975` for df <= 30, else the Cornish-Fisher expansion of the t quantile in 1/df."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(g / df ** (k + 1) for k, g in enumerate(terms))


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def paired(diffs: list[float]) -> dict:
    """Mean of paired differences, their sample sd and the two-sided 95% Student-t interval
    of the mean (`mean +- t(0.975, n-1) sd / sqrt(n)`; None for a single pair)."""
    s = spread(diffs)
    ci = None
    if s["n"] > 1:
        half = t_quantile_975(s["n"] - 1) * s["sd"] / math.sqrt(s["n"])
        ci = [s["mean"] - half, s["mean"] + half]
    return {"mean_pct": s["mean"], "sd_pct": s["sd"], "ci95_pct": ci, "df": s["n"] - 1}


def default_peers(rows: list[dict]) -> list[str]:
    """The configurations a recipe is compared with by default: `PEERS`, and any label of
    `rows` that starts with "rose-published" (ROSE as its repository publishes it), not a
    composition on its mask ("rose-published+lstsq" is a lever, not a peer)."""
    extra = sorted(
        {c for r in rows if (c := r["config"]).startswith("rose-published") and "+" not in c}
    )
    return [*PEERS, *(c for c in extra if c not in PEERS)]


def summarize(rows: list[dict], recipe: str = RECIPE, peers: list[str] | None = None) -> dict:
    """Per (pattern, text): each configuration's `spread` over its seeds, and the recipe
    against the best of `peers` (lowest mean; default `default_peers`) on the seeds both ran:
    the margin of their means, on how many of those seeds the recipe was lower, whether the
    margin exceeds both standard deviations, and the paired differences seed by seed (peer
    minus recipe, in % of the peer's mean on those seeds: positive where the recipe is lower)
    with their mean and its 95% Student-t interval (`paired`)."""
    peers = default_peers(rows) if peers is None else list(peers)
    last = {key(r): r for r in rows}
    texts = [k[4:] for k in next(iter(last.values()), {}) if k.startswith("ppl_")]
    pats = list(dict.fromkeys(k[1] for k in last if k[1] != "-"))
    out = {}
    for p in pats:
        for t in texts:
            per = {}
            for (c, pat, seed), r in last.items():
                if pat == p and f"ppl_{t}" in r:
                    per.setdefault(c, {})[seed] = r[f"ppl_{t}"]
            cell = {c: spread(list(v.values())) for c, v in per.items()}
            secs = {}
            for (c, pat, _), r in last.items():
                if pat == p and "prune_s" in r:
                    secs.setdefault(c, []).append(r["prune_s"])
            for c in cell:
                cell[c]["prune_s"] = statistics.median(secs[c]) if c in secs else None
            verdict = None
            rivals = [c for c in cell if c in peers and c != recipe]
            if recipe in cell and rivals:
                best = min(rivals, key=lambda c: cell[c]["mean"])
                shared = sorted(set(per[recipe]) & set(per[best]), key=str)
                if shared:  # compared on the calibration samples both ran
                    mine = spread([per[recipe][s] for s in shared])
                    theirs = spread([per[best][s] for s in shared])
                    gap = theirs["mean"] - mine["mean"]
                    diffs = [100 * (per[best][s] - per[recipe][s]) / theirs["mean"] for s in shared]
                    verdict = {
                        "best_peer": best,
                        "margin_pct": 100 * gap / theirs["mean"],
                        "wins": sum(per[recipe][s] < per[best][s] for s in shared),
                        "seeds": len(shared),
                        "beyond_spread": len(shared) > 1 and gap > max(mine["sd"], theirs["sd"]),
                        "shared_seeds": shared,
                        "diffs_pct": diffs,
                        **paired(diffs),
                    }
            out[(p, t)] = {"cells": cell, "verdict": verdict}
    return out


def verdict_text(v: dict) -> str:
    """A comparison as the .md table shows it: the mean paired difference, its 95% interval
    (two or more seeds), the peer, and the seeds the recipe was lower on."""
    ci = "" if v["ci95_pct"] is None else " [{:+.1f}, {:+.1f}]".format(*v["ci95_pct"])
    return f"{v['mean_pct']:+.1f}%{ci} vs {v['best_peer']} ({v['wins']}/{v['seeds']})"


def table(args) -> None:
    """OUT.json/.csv (every row) and OUT.md: per pattern, each configuration's mean +- sd
    of perplexity on every text and its median prune seconds (robust to one run that shared
    the cores), the recipe in bold where its paired 95% interval against the best peer lies
    above 0; then every other configuration against the best peer (`verdict_text`).
    OUT.summary.json holds the cells and the comparisons (`summarize`'s verdicts).
    `args.peers`: the peers, comma-separated (absent or None: `default_peers`)."""
    rows = load_rows(Path(args.out + ".jsonl"))
    write_rows(rows, args.out)
    spec = getattr(args, "peers", None)
    peers = default_peers(rows) if spec is None else [c for c in spec.split(",") if c]
    summ = summarize(rows, peers=peers)
    dense = next((r for r in reversed(rows) if r["config"] == "dense"), {})
    texts = [k[4:] for k in dense if k.startswith("ppl_")] or sorted({t for _, t in summ})
    pats = list(dict.fromkeys(p for p, _ in summ))
    lines = []
    for p in pats:
        n = max((c["n"] for t in texts for c in summ.get((p, t), {"cells": {}})["cells"].values()),
                default=0)  # fmt: skip
        lines += [
            f"### {p} (mean +- sd over up to {n} calibration seeds; prune seconds: median)",
            "",
            "| method | " + " | ".join(texts) + " | prune s |",
            "|---|" + "---|" * (len(texts) + 1),
            "| dense | " + " | ".join(f"{dense.get('ppl_' + t, 0):.2f}" for t in texts) + " | |",
        ]
        configs = list(dict.fromkeys(c for t in texts for c in summ[(p, t)]["cells"]))
        first = [c for c in (*peers, RECIPE) if c in configs]
        for c in first + [c for c in configs if c not in first]:
            cells, secs = [], None
            for t in texts:
                x = summ[(p, t)]["cells"].get(c)
                best = summ[(p, t)]["verdict"]
                above = c == RECIPE and best and best["ci95_pct"] and best["ci95_pct"][0] > 0
                mark = "**" if above else ""
                cells.append(
                    ""
                    if x is None
                    else f"{mark}{x['mean']:.2f} +- {x['sd']:.2f}{mark} (n={x['n']})"
                )
                secs = secs or (x and x["prune_s"])
            lines.append(f"| {c} | " + " | ".join(cells) + f" | {secs or 0:.0f} |")
        lines.append("")
    lines += [
        "### Each recipe against the best peer (peer minus recipe, paired by seed, in % of the "
        "peer's mean: positive = the recipe lower; [95% Student-t interval]; seeds it was lower "
        f"on). Peers: {', '.join(peers)}",
        "",
        "| recipe | pattern | " + " | ".join(texts) + " |",
        "|---|---|" + "---|" * len(texts),
    ]
    comparisons = []
    others = dict.fromkeys(r["config"] for r in rows if r["config"] not in (*peers, "dense"))
    for cand in sorted(others, key=lambda c: (c != RECIPE, c)):
        verdicts = summ if cand == RECIPE else summarize(rows, cand, peers)
        for p in pats:
            cells = []
            for t in texts:
                v = verdicts[(p, t)]["verdict"]
                cells.append("" if v is None else verdict_text(v))
                if v is not None:
                    comparisons.append({"recipe": cand, "pattern": p, "text": t, **v})
            if any(cells):
                lines.append(f"| {cand} | {p} | " + " | ".join(cells) + " |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    cells = [
        {"pattern": p, "text": t, "config": c, **x}
        for (p, t), s in summ.items()
        for c, x in s["cells"].items()
    ]
    summary = {"peers": peers, "cells": cells, "comparisons": comparisons}
    Path(args.out + ".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--configs", default="peers,fastprune", help="groups or labels, comma-separated"
    )
    ap.add_argument("--patterns", default="50%,2:4,70%,4:8")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seeds", default="0,1,2", help="calibration window seeds, comma-separated")
    ap.add_argument(
        "--texts",
        default="builtin,gpl3,code",
        help="evaluation texts: names of the defaults or name=path, comma-separated",
    )
    ap.add_argument("--out", default=OUT)
    ap.add_argument(
        "--rerun", action="store_true", help="run finished rows again (the table keeps the last)"
    )
    ap.add_argument("--table", action="store_true", help="only write the table from OUT.jsonl")
    ap.add_argument(
        "--peers",
        default=None,
        help="the configurations a recipe is compared with in the table, comma-separated "
        "(default: the peers group and any label starting with rose-published)",
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    (table if args.table else run)(args)


if __name__ == "__main__":
    main()
