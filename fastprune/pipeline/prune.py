"""`prune_model`: sequential, block by block, the way SparseGPT and Wanda do it (see the
package docstring of `fastprune.pipeline`), as a short sequence of named stages: check the
arguments (`check_prune_args`, over the one check of `fastprune.config`), then a `PruneRun`'s
gradient pass (GBLM), layer-wise allocation (OWL), capture of the first block's inputs and,
per block, its calibration (Hessians), its layer solves and the propagation of its pruned
outputs. What each method needs and how its solver is called comes from `fastprune.METHODS`.
"""

from __future__ import annotations

import time

from torch import nn

from ..config import PruneConfig, make_config, options
from ..methods import METHODS, selectors
from ..solvers.recipes import RECONSTRUCT, REFINE_ON, REFINERS
from .arguments import PruneArgs, check_prune_args
from .blockstore import BlockStore, ResidentBlocks, guarded, peak_host_memory
from .distributed import Comm, active_world
from .layer_solves import EXPERT_BATCH_BYTES
from .report import PruneReport
from .stages import PruneRun

__all__ = [
    "EXPERT_BATCH_BYTES",
    "BlockStore",
    "PruneArgs",
    "PruneRun",
    "ResidentBlocks",
    "check_prune_args",
    "peak_host_memory",
    "prune_model",
    "run_stages",
]


def prune_model(
    model: nn.Module,
    calibration=None,
    config: PruneConfig | None = None,
    *positional,
    tokenizer=None,
    **overrides,
) -> PruneReport:
    # the docstring is made by `prune_model_doc` from the configuration and the registry
    config = make_config(config, positional, overrides)
    return run_stages(model, calibration, config, ResidentBlocks(), tokenizer)


def run_stages(
    model: nn.Module, calibration, config: PruneConfig, store: BlockStore, tokenizer=None
) -> PruneReport:
    """`prune_model`'s stages on `config`, the decoder blocks kept between stages by `store`
    (in the model, or streamed from a checkpoint)."""
    t_start = time.perf_counter()
    comm = Comm() if active_world() > 1 else None
    with guarded(comm, "setup (arguments, model, calibration)"):
        args = check_prune_args(model, calibration, config, tokenizer)
        if comm is not None and args.asymmetric:
            raise ValueError("asymmetric=True runs in one process, not under torch.distributed")
        store.check(args)
    run = PruneRun(args, comm, t_start, store)
    store.started(run.report)
    run.agree()
    was_training = model.training
    try:
        run.preflight()  # before any weight changes: refuses what would not calibrate right
        run.gradients()
        model.eval()
        run.allocate()
        run.capture()
        with guarded(comm, "opening the output"):  # rank 0's writer: every rank hears
            store.captured(args)
        for i in run.progress():
            hooks = run.calibrate_block(i)
            run.solve_block(i, hooks)
            del hooks  # the block's Hessians, freed before the propagation
            run.propagate_block(i)
    except BaseException as e:
        run.interrupted(e)
        raise
    finally:
        run.close()
        model.train(was_training)
    return run.finish()


_LEAD = """Prune every linear layer (and every expert of MoE blocks) of the decoder blocks of
`model` in place; return a `PruneReport`.

    prune_model(model, calibration, config=None, *, tokenizer=None, **overrides)

calibration: LongTensor `[nsamples, seqlen]` of token ids (used as given), or text to
    tokenize with `tokenizer` and sample `nsamples` windows of `seqlen` from (seeded by
    `seed`): a list of strings, a text file path, 'builtin', 'wikitext2' or 'c4'.
    Not needed for `magnitude`.
config: a `fastprune.PruneConfig`; `overrides` replace its options by keyword, and any
    other keyword is an option of the method (`METHODS[method].options`). The former
    positional order `(model, calibration, method, sparsity, prune_n, prune_m, device)`
    still works, with a DeprecationWarning.

Options (`fastprune.config.PruneConfig`; docs/options.md has the table):
"""

_TAIL = """
Targets/ignore are glob patterns on layer names inside a block (`self_attn.*`, `q_proj`,
`mlp.experts.down_proj`): every matrix of a block is pruned, left dense by a rule (MoE
routers, expert bias tables) or by targets/ignore; any other is an error naming it (see
`fastprune.pipeline.block_layers`). An expert that receives no calibration token is pruned with
`H = I` (by weight magnitude), with a warning.

Inside an initialised torch.distributed process group of size > 1, every rank calls this
with its own replica of the model and the same arguments (those marked agreed in
docs/options.md are checked before any work: a `ValueError` names what differs): each rank
calibrates on its shard of the samples (GBLM: computes its gradient norms on it), Hessians
and gradient norms are summed onto owner ranks, layers are solved on their owners (or in
row ranges on several ranks when that balances the block better; see `FASTPRUNE_ROW_SPLIT`
in `fastprune.pipeline.distributed`) and broadcast, and every rank ends with the same pruned
model and report. An error on one rank stops all of them (`RankFailedError` on the others).
"""


def _wrap(text: str, indent: str, width: int = 92) -> list[str]:
    import textwrap

    return textwrap.wrap(" ".join(text.split()), width, initial_indent=indent,
                         subsequent_indent=indent + "    ")  # fmt: skip


def prune_model_doc() -> str:
    """`prune_model`'s docstring: the options of `PruneConfig`, the methods of `METHODS`
    with their options, and the reconstruction choices of `RECONSTRUCT`."""
    lines = _LEAD.splitlines()
    for key, opt in options(PruneConfig).items():
        if key != "options":
            lines += _wrap(f"{key} (default {opt.default!r}): {opt.text}", "")
    lines += ["", "Methods (`fastprune.METHODS`) and their options (keywords of prune_model):"]
    for name, meth in METHODS.items():
        opts = ", ".join(f"{k}={v!r}" for k, v in meth.options.items()) or "no options"
        lines += _wrap(f"{name}: {meth.description}; {opts}", "    ")
    choices = ", ".join(repr(r) for r in RECONSTRUCT if r is not False)
    lines += _wrap(
        f"A mask selector ({', '.join(selectors())}) also takes refine "
        f"({' | '.join(map(repr, REFINERS))}), refine_on ({' | '.join(map(repr, REFINE_ON))}), "
        f"max_swaps and reconstruct ({choices}): `fastprune.compose_layer` then solves each "
        "layer; sparseswaps takes reconstruct=True.",
        "",
    )
    return "\n".join(lines) + "\n" + _TAIL


prune_model.__doc__ = prune_model_doc()
