"""Zero-shot evaluation of an in-memory model with EleutherAI's lm-evaluation-harness
(`pip install 'fastprune[eval]'`).

Tasks are loaded (and their datasets fetched) once by `load_tasks`, so a bad name or a dataset
that cannot be fetched fails before any pruning; `lm_eval_tasks` runs them on a model and
returns each task's accuracy metrics with their standard errors.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from ..models import evaluating_on

INSTALL_HINT = "pip install 'fastprune[eval]'"


def _import_lm_eval():
    """The `lm_eval` package, or a RuntimeError saying how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RuntimeError(
            f"zero-shot evaluation needs lm-evaluation-harness (lm_eval >= 0.4): {INSTALL_HINT}"
            f" ({e})"
        ) from e
    return lm_eval, HFLM, TaskManager


def parse_tasks(tasks, arg: str = "tasks") -> list[str]:
    """'arc_easy,piqa' or a list of names -> a list of distinct names (order kept)."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    if not isinstance(tasks, list | tuple) or not all(isinstance(t, str) for t in tasks):
        raise TypeError(f"{arg} must be a comma-separated string or a list of task names")
    names = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    if not names:
        raise ValueError(f"{arg} names no lm-eval task (e.g. arc_easy,piqa)")
    return names


def _include_paths(include, arg: str) -> list[str]:
    if include is None:
        return []
    paths = [include] if isinstance(include, str | Path) else list(include)
    for p in paths:
        if not Path(p).expanduser().is_dir():
            raise ValueError(f"{arg} {str(p)!r} is not a directory of lm-eval task YAMLs")
    return [str(Path(p).expanduser()) for p in paths]


class LoadedTasks:
    """lm-eval tasks built once (datasets fetched), to run on any number of models."""

    def __init__(self, names: list[str], objects: list, include: list[str]):
        self.names = names
        self.objects = objects
        self.include = include

    def __repr__(self) -> str:
        return f"LoadedTasks({', '.join(self.names)})"


def load_tasks(
    tasks, include=None, *, arg: str = "tasks", include_arg: str = "include"
) -> LoadedTasks:
    """Build lm-eval tasks by name (`'arc_easy,piqa'` or a list), with task YAMLs from the
    `include` directories too. Unknown names and datasets that cannot be fetched are
    `ValueError`s naming the task (and `arg`, the argument or flag it came from)."""
    _import_lm_eval()
    names = parse_tasks(tasks, arg)
    paths = _include_paths(include, include_arg)
    manager = _task_manager(tuple(paths))
    known = set(manager.all_tasks)
    objects = []
    for name in names:
        if name not in known and not Path(name).is_file():
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" (nor in {', '.join(paths)})" if paths else f" (add yours: {include_arg} DIR)"
            raise ValueError(f"{arg}: {name!r} is not an lm-eval task{where}{hint}")
        try:
            loaded = manager.load([name])
        except Exception as e:  # datasets raises many kinds (connection, file, hub errors)
            raise ValueError(
                f"{arg}: lm-eval task {name!r}: its dataset could not be loaded "
                f"({type(e).__name__}: {_first_line(e)}); the Hugging Face hub must be "
                "reachable (or the dataset cached), or the task's data files present"
            ) from e
        if name in loaded["groups"]:
            objects.append(loaded["groups"][name])
        else:
            objects.extend(loaded["tasks"].values())
    return LoadedTasks(names, objects, paths)


_MANAGERS: dict[tuple, object] = {}


def _task_manager(paths: tuple[str, ...]):
    """lm-eval's TaskManager for these include paths, built again only when their YAML files
    change (building one indexes every task YAML lm-eval ships, which is slow)."""
    key = (paths, tuple(sorted(_yaml_stamps(paths))))
    if key not in _MANAGERS:
        _, _, TaskManager = _import_lm_eval()
        _quiet_lm_eval()
        _MANAGERS.clear()
        _MANAGERS[key] = TaskManager(include_path=list(paths) or None)
    return _MANAGERS[key]


def _yaml_stamps(paths):
    for p in paths:
        for f in Path(p).rglob("*.y*ml"):
            st = f.stat()
            yield str(f), st.st_mtime_ns, st.st_size


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else "no message"


def _quiet_lm_eval() -> None:
    """lm-eval logs every step at INFO; keep its warnings only."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)


def lm_eval_tasks(
    model,
    tokenizer,
    tasks,
    *,
    limit: int | float | None = None,
    batch_size: int = 1,
    device=None,
    include=None,
    num_fewshot: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict:
    """Run lm-eval tasks on an in-memory causal LM and its tokenizer.

    `tasks`: 'arc_easy,piqa', a list of names, or `load_tasks(...)` (built once, reused).
    `limit`: at most this many examples per task (a float < 1: a fraction). `device`: run
    there (the model is moved for the call and back). Returns
    `{task: {'acc': .., 'acc_stderr': .., 'acc_norm': .., ..., 'samples': n}}` with the
    metrics lm-eval reports (a metric's filter other than 'none' stays in its name)."""
    lm_eval, HFLM, _ = _import_lm_eval()
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0
    ):
        raise ValueError(f"limit must be a positive number of examples, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    loaded = tasks if isinstance(tasks, LoadedTasks) else load_tasks(tasks, include)
    _quiet_lm_eval()
    with evaluating_on(model, device):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        if not progress:
            _silence(lm)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(loaded.objects),
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return _metrics(out)


def _silence(lm) -> None:
    """No per-request progress bars (`--no-progress`)."""
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        run = getattr(lm, name)

        def quiet(requests, disable_tqdm=True, _run=run):
            return _run(requests, disable_tqdm=True)

        setattr(lm, name, quiet)


def _metrics(out: dict) -> dict:
    """lm-eval's `results` as `{task: {metric: value}}`: 'acc,none' -> 'acc'."""
    samples = out.get("n-samples", {})
    table = {}
    for task, res in out["results"].items():
        row = {}
        for key, value in res.items():
            if key in ("alias", "sample_len") or not isinstance(value, int | float):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
        if task in samples:
            row["samples"] = int(samples[task].get("effective", 0))
        table[task] = row
    return table


def format_comparison(dense: dict | None, pruned: dict | None) -> str:
    """A table of each task's metrics (± stderr): dense next to pruned."""
    cols = [(label, r) for label, r in (("dense", dense), ("pruned", pruned)) if r is not None]
    tasks = list(dict.fromkeys(t for _, r in cols for t in r))
    lines = [f"{'task':<24} {'metric':<10}" + "".join(f" {label:>17}" for label, _ in cols)]
    for task in tasks:
        metrics = [
            m
            for m in dict.fromkeys(k for _, r in cols for k in r.get(task, {}))
            if not m.endswith("_stderr") and "_stderr," not in m and m != "samples"
        ]
        for i, m in enumerate(metrics):
            cells = []
            for _, r in cols:
                row = r.get(task, {})
                v = row.get(m)
                se = row.get(m.replace(",", "_stderr,", 1) if "," in m else f"{m}_stderr")
                cell = "-" if v is None else f"{v:.4f}"
                if v is not None and isinstance(se, float) and se == se:
                    cell += f" ± {se:.4f}"
                cells.append(f" {cell:>17}")
            lines.append(f"{task if i == 0 else '':<24} {m:<10}" + "".join(cells))
    return "\n".join(lines)
