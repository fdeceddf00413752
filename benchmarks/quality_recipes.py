"""Perplexity of every peer method and of fastprune's recipes on the built-in model.

SmolLM2-135M (built in), 32x512 calibration windows of the built-in text, perplexity on the
built-in evaluation text (CPython's help topics, held out) and on a text of another domain:
the GNU GPL version 3 (legal prose; Debian ships it in `/usr/share/common-licenses/GPL-3`,
any file can be given with `--second-text`). Every configuration prunes a fresh copy of the
dense weights; its prune seconds are `PruneReport.seconds` (calibration forwards, Hessians,
gradients, solves). Rows are appended to `OUT.jsonl` as they finish, so an interrupted run
resumes where it stopped (`--rerun` runs finished rows again; the table keeps the last row of
each configuration and pattern); `--table` writes `OUT.json`, `OUT.csv` and `OUT.md` from them.

    python -m benchmarks.quality_recipes --configs peers --patterns 50%,2:4
    python -m benchmarks.quality_recipes --table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fastprune as fp
from benchmarks.harness import device_name, versions, write_rows
from fastprune.data import get_calibration, read_text_file, text_for, tokenize
from fastprune.evaluate import perplexity

OUT = "benchmarks/results/quality_recipes_smollm2_cpu"
SECOND_TEXT = "/usr/share/common-licenses/GPL-3"

# label -> prune_model keyword arguments (besides calibration, sparsity and pattern)
PEERS = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "gblm": {"method": "gblm"},
    "sparsegpt": {"method": "sparsegpt"},
    "rose": {"method": "rose"},
    "sparseswaps": {"method": "sparseswaps"},
}
COMBOS = {
    "fastprune": {"method": "fastprune"},
    # SparseSwaps (Wanda's mask, swaps within its budget) + fastprune's OBS reconstruction
    "sparseswaps+rec": {"method": "sparseswaps", "reconstruct": True},
    "sparsegpt+swaps+best": {
        "method": "sparsegpt", "refine": "sparseswaps", "reconstruct": "best",
    },
    "sparsegpt+owl": {"method": "sparsegpt", "allocation": "owl"},
    "fastprune+owl": {"method": "fastprune", "allocation": "owl"},
    "rose+swaps+best": {"method": "rose", "refine": "sparseswaps", "reconstruct": "best"},
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
}  # fmt: skip
GROUPS = {"peers": PEERS, "combos": COMBOS}


def pattern_args(p: str) -> dict:
    if p.endswith("%"):
        return {"sparsity": float(p[:-1]) / 100, "prune_n": 0, "prune_m": 0}
    n, m = (int(x) for x in p.split(":"))
    return {"sparsity": n / m, "prune_n": n, "prune_m": m}


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(args) -> None:
    jsonl = Path(args.out + ".jsonl")
    done = {(r["config"], r["pattern"]) for r in load_rows(jsonl)}
    configs = {}
    for name in args.configs.split(","):
        if name in GROUPS:
            configs.update(GROUPS[name])
        elif name in PEERS or name in COMBOS:
            configs[name] = {**PEERS, **COMBOS}[name]
        else:
            known = ", ".join([*GROUPS, *PEERS, *COMBOS])
            raise SystemExit(f"unknown config {name!r}; known: {known}")
    todo = [
        (c, p)
        for p in args.patterns.split(",")
        for c in configs
        if args.rerun or (c, p) not in done
    ]
    if not todo and ("dense", "-") in done:
        print("nothing to do")
        return
    torch.manual_seed(0)
    model, tok = fp.load_model(args.model)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = get_calibration("builtin", tok, args.nsamples, args.seqlen, seed=0)
    texts = {
        "builtin": tokenize(tok, text_for("builtin", "eval")),
        "gpl3": tokenize(tok, read_text_file(args.second_text, "eval")),
    }

    def evaluate() -> dict:
        return {
            f"ppl_{k}": round(
                perplexity(model, ids, args.seqlen, max_windows=args.eval_windows)["ppl"], 4
            )
            for k, ids in texts.items()
        }

    common = {
        "model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "eval_windows": args.eval_windows, "device": device_name("cpu"), **versions(),
    }  # fmt: skip
    with jsonl.open("a") as f:
        if ("dense", "-") not in done:
            f.write(json.dumps({"config": "dense", "pattern": "-", **evaluate(), **common}) + "\n")
            f.flush()
        for config, pat in todo:
            model.load_state_dict(dense)
            kw = dict(configs[config])
            t0 = time.perf_counter()
            rep = fp.prune_model(
                model, calib, **pattern_args(pat), progress=not args.no_progress, **kw
            )
            wall = time.perf_counter() - t0
            row = {
                "config": config,
                "pattern": pat,
                **evaluate(),
                "prune_s": round(rep.seconds, 1),
                "wall_s": round(wall, 1),
                "loss": rep.totals.get("loss"),
                "achieved_sparsity": round(rep.achieved_sparsity, 5),
                "options": {k: v for k, v in kw.items() if k != "method"},
                "method": kw["method"],
                **common,
            }
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
            f.flush()


def table(args) -> None:
    """OUT.json/.csv (every row) and OUT.md: per configuration (peers and fastprune first)
    and pattern, the last row's perplexity on both texts and its prune seconds."""
    rows = load_rows(Path(args.out + ".jsonl"))
    write_rows(rows, args.out)
    pats = list(dict.fromkeys(r["pattern"] for r in rows if r["pattern"] != "-"))
    by = {(r["config"], r["pattern"]): r for r in rows}
    dense = by.get(("dense", "-"), {})
    ran = list(dict.fromkeys(r["config"] for r in rows if r["config"] != "dense"))
    first = [c for c in (*PEERS, "fastprune") if c in ran]
    order = first + [c for c in ran if c not in first]
    lines = [
        "| method | " + " | ".join(f"{p}: builtin / gpl3 (prune s)" for p in pats) + " |",
        "|---|" + "---|" * len(pats),
        "| dense | " + " | ".join(
            f"{dense.get('ppl_builtin', 0):.2f} / {dense.get('ppl_gpl3', 0):.2f}" for _ in pats
        ) + " |",
    ]  # fmt: skip
    for c in order:
        cells = []
        for p in pats:
            r = by.get((c, p))
            cells.append(
                ""
                if r is None
                else f"{r['ppl_builtin']:.2f} / {r['ppl_gpl3']:.2f} ({r['prune_s']:.0f})"
            )
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", default="peers,combos", help="groups or labels, comma-separated")
    ap.add_argument("--patterns", default="50%,2:4,70%,4:8")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--second-text", default=SECOND_TEXT)
    ap.add_argument("--out", default=OUT)
    ap.add_argument(
        "--rerun", action="store_true", help="run finished rows again (the table keeps the last)"
    )
    ap.add_argument("--table", action="store_true", help="only write the table from OUT.jsonl")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    (table if args.table else run)(args)


if __name__ == "__main__":
    main()
