"""Host memory and time of a streamed prune against the in-memory one, on one checkpoint.

Each path runs in a fresh process (so its peak RSS is its own, `getrusage`): "memory" loads
the model with transformers, prunes it with `prune_model` and saves it with
`save_pretrained`; "streamed" runs `prune_checkpoint` (one block in memory at a time, written
as it goes). Both get the same random calibration token ids. Rows go to
`benchmarks/results/stream_<device>.{json,md}`.

    python -m benchmarks.make_random_checkpoint /tmp/llama-random     # ~6.2 GB, bfloat16
    python -m benchmarks.bench_stream /tmp/llama-random --method wanda
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def run_path(args) -> dict:
    """One path in this process; its row."""
    import transformers

    from fastprune import prune_model
    from fastprune.pipeline.prune import peak_host_memory
    from fastprune.pipeline.stream import prune_checkpoint
    from fastprune.streaming import open_checkpoint

    ckpt = open_checkpoint(args.checkpoint)
    vocab = ckpt.config_dict["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=gen)
    kw = {"method": args.method, "sparsity": 0.5, "progress": False}
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.path == "streamed":
        report = prune_checkpoint(ckpt, out, calib, **kw)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.checkpoint, dtype=ckpt.stored_dtype()
        )
        report = prune_model(model, calib, **kw)
        model.save_pretrained(out, max_shard_size="1GB")
    seconds = time.perf_counter() - t0
    return {
        "path": args.path,
        "method": args.method,
        "checkpoint_GB": ckpt.nbytes / 1e9,
        "blocks": report.totals["blocks"],
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "seconds": seconds,
        "prune_seconds": report.seconds,
        "peak_rss_GB": peak_host_memory() / 1e9,
        "activation_GB": report.totals.get("activation_bytes", 0) / 1e9,
        "achieved_sparsity": report.achieved_sparsity,
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--method", default="wanda")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--work", default="/tmp/bench-stream", help="where the outputs are written")
    p.add_argument("--results", default=str(RESULTS), help="where the table goes")
    p.add_argument(
        "--paths",
        default="streamed,memory",
        help="the paths to run (the table keeps the other paths' rows from an earlier run)",
    )
    p.add_argument("--path", choices=["memory", "streamed"], help="run one path (internal)")
    p.add_argument("--out", help="output folder of --path (internal)")
    args = p.parse_args(argv)
    if args.path:
        print(json.dumps(run_path(args)))
        return
    results = Path(args.results)
    table = results / "stream_cpu.json"
    old = {r["path"]: r for r in json.loads(table.read_text())} if table.is_file() else {}
    rows = []
    for path in ("streamed", "memory"):
        if path not in args.paths.split(","):
            if path in old:
                rows.append(old[path])
            continue
        out = Path(args.work) / path
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "benchmarks.bench_stream", args.checkpoint, "--path", path]
        cmd += ["--out", str(out), "--method", args.method]
        cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    results.mkdir(parents=True, exist_ok=True)
    (results / "stream_cpu.json").write_text(json.dumps(rows, indent=1) + "\n")
    cols = ["path", "method", "checkpoint_GB", "blocks", "seconds", "peak_rss_GB", "activation_GB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    (results / "stream_cpu.md").write_text(
        f"Streamed vs in-memory prune of {args.checkpoint} ({rows[0]['device']}, torch "
        f"{rows[0]['torch']}, transformers {rows[0]['transformers']}; {args.nsamples} x "
        f"{args.seqlen} calibration tokens; seconds include loading and saving)\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
