"""ROSE: SparseGPT with columns reordered by estimated pruning loss (columnar layers first).

Pre-pruning score `S = |W| * sqrt(diag(H)/2)`; per block, the `sparsity` fraction of lowest
`S` forms the loss matrix; columns are sorted by descending column loss inside each block and
blocks by descending block loss when the block losses' relative range `(max-min)/max`
exceeds `range_threshold`; SparseGPT then runs on the permuted layer and the result is
un-permuted. Blocks are compared per column (block loss / block width) when a short last
block makes their widths differ (`range_rule="per_column"`), so that block's smaller sum
does not make a uniform layer look columnar; `range_rule="block_sum"` is the original rule.
For N:M the blocks are the groups of `prune_m` columns, so a permutation only moves whole
groups (and columns inside a group) and the pattern stays valid.

Method "rose" takes `score_scaler`: "hessian" (`diag(H)/2`, the default) or "running", the ROSE
repository's own running scaler of the inputs (sample k weighted `1/n_k`; see
`fastprune.hessian.RunningScaler`) with its block-sum range rule, as the compat `ROSE`
adapter computes it; the pipeline accumulates that scaler beside `H`.
"""

from __future__ import annotations

import torch

from ..hessian import DEFAULT_PERCDAMP, inverse_hessian
from ..masks import pattern_name, pruned_fraction
from ..quant import QuantSpec, as_spec
from ..result import PruneResult
from ..validation import check_rows, check_scaler
from .core import active_world, check_obs_options, check_quant_pattern, wanda_score
from .obs import (
    DEFAULT_BLOCKSIZE,
    OBS_OPS,
    block_bounds,
    nm_blocksize,
    quant_blocksize,
)
from .registry import Method, Selection, register, solver_defaults
from .skeleton import (
    Outcome,
    Problem,
    beyond_lead,
    check_given_mask,
    legacy_positional,
    run_solver,
    unpruned,
)
from .sparsegpt import swept

ROSE_OPS = (*OBS_OPS, "column_losses")
RANGE_RULES = ("per_column", "block_sum")
# method "rose"'s pre-pruning scaler: diag(H)/2, or the ROSE repository's running one
ROSE_SCALERS = ("hessian", "running")


def relative_range(block_loss: torch.Tensor) -> float:
    """`(max - min) / max` of the block losses; 0 when every block loss is 0."""
    hi = block_loss.max().item()
    lo = block_loss.min().item()
    return 0.0 if hi <= 0 else (hi - lo) / hi


def comparable_block_losses(
    block_loss: torch.Tensor, bounds: list[tuple[int, int]], rule: str = "per_column"
) -> torch.Tensor:
    """The block losses ROSE ranks and takes the relative range of.

    "per_column": each block's loss over its width when the widths differ (a short last
    block), else the sums unchanged, so full-block layers get exactly the original values.
    "block_sum": the sums, as the ROSE repository (geometry-dependent with a short block).
    """
    if rule not in RANGE_RULES:
        raise ValueError(f"range_rule must be one of {RANGE_RULES}, got {rule!r}")
    widths = [i2 - i1 for i1, i2 in bounds]
    if rule == "block_sum" or len(set(widths)) <= 1:
        return block_loss
    return block_loss / torch.tensor(widths, dtype=block_loss.dtype, device=block_loss.device)


def rose_permutation(
    col_loss: torch.Tensor, block_loss: torch.Tensor, bounds: list[tuple[int, int]]
) -> tuple[torch.Tensor, list[int]]:
    """Blocks by descending block loss, columns inside each by descending column loss.

    Stable sorts, so equal losses keep their original order. Returns the permutation
    (`W[:, perm]` is the reordered layer) and the sizes of the blocks in their new order.
    """
    order = torch.sort(block_loss, descending=True, stable=True).indices.tolist()
    pieces, sizes = [], []
    for b in order:
        i1, i2 = bounds[b]
        inner = torch.sort(col_loss[i1:i2], descending=True, stable=True).indices
        pieces.append(inner + i1)
        sizes.append(i2 - i1)
    return torch.cat(pieces), sizes


@legacy_positional(
    (
        "W", "H", "sparsity", "prune_n", "prune_m",
        "blocksize", "percdamp", "range_threshold", "backend",
    ),
    beyond_lead,
    "rose_layer(W, H, sparsity, prune_n, prune_m, blocksize=..., range_threshold=..., ...)",
)  # fmt: skip
@torch.no_grad()
def rose_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    range_threshold: float = 0.5,
    backend: str = "auto",
    scaler: torch.Tensor | None = None,
    inplace: bool = False,
    inverse_method: str = "direct",
    range_rule: str = "per_column",
    rows: slice | None = None,
    mask: torch.Tensor | None = None,
    quant: QuantSpec | str | None = None,
) -> PruneResult:
    """Prune one layer with ROSE; `info` reports `relative_range` and `reordered`.

    Arguments as `sparsegpt_layer`. `range_threshold` is the relative range of block losses
    above which the layer counts as columnar and is reordered (the paper's 0.5).
    `scaler` replaces `diag(H)/2` in the pre-pruning score `|W| * sqrt(scaler)` (the ROSE
    repository's own running scaler, say: see `fastprune.compat.ROSE`). `inverse_method`:
    how `inverse_hessian` factors the (permuted) `H`, "direct" or "reference".
    `range_rule`: how blocks are compared (range and order), "per_column" (loss per column
    where a short last block makes widths differ; identical to the sums otherwise) or
    "block_sum" (the ROSE repository's sums; `fastprune.compat` uses it).
    `rows`: prune only these rows (a slice), with the column order of the whole layer, so
    for N:M the result is exactly those rows of the whole layer's (not with `inplace`).
    `mask` (True = kept; the pruned rows' mask with `rows`) prunes exactly that pattern with
    the OBS updates run in ROSE's column order (the order still comes from `sparsity` and the
    scores), as `sparsegpt_layer(mask=...)` does in the natural order.
    `quant` (a `QuantSpec` or a preset name): each kept weight also rounded to its grid in
    the same sweep, as `sparsegpt_layer(quant=)` does, in ROSE's column order (groups of
    `group_size` columns from each sweep block's start; act-order is refused: ROSE orders
    the columns itself).
    """

    def check(W: torch.Tensor, H: torch.Tensor | None) -> None:
        nonlocal blocksize, percdamp, scaler
        blocksize, percdamp = check_obs_options(blocksize, percdamp)
        check_rows(rows, inplace)
        if not isinstance(range_threshold, int | float) or range_threshold != range_threshold:
            raise TypeError(f"range_threshold must be a number, got {range_threshold!r}")
        if range_rule not in RANGE_RULES:
            raise ValueError(f"range_rule must be one of {RANGE_RULES}, got {range_rule!r}")
        if scaler is not None:
            scaler = check_scaler(scaler, W.shape[1], W.device, "scaler")
        if mask is not None:
            check_given_mask(mask, W if rows is None else W[rows], prune_n, prune_m)
        check_quant_pattern(spec, prune_n, prune_m)
        if spec is not None and spec.actorder:
            raise ValueError(
                "quant.actorder is not taken by rose_layer: ROSE orders the columns itself "
                "(act-order: sparsegpt_layer or gptq_layer)"
            )

    def solve(p: Problem) -> Outcome:
        W, H, sparsity, n, m, dtype = p.W, p.H, p.sparsity, p.n, p.m, p.dtype
        cols = W.shape[1]
        info = p.info
        sweep_bs = quant_blocksize(nm_blocksize(blocksize, m), spec)
        info.update(
            blocksize=sweep_bs,
            percdamp=percdamp,
            range_threshold=float(range_threshold),
            range_rule=range_rule,
        )
        Wr = W if rows is None else W[rows]  # the rows pruned (the order comes from all of W)
        keep_all = n == 0 and sparsity == 0.0 and mask is None
        if keep_all and spec is None:
            info.update(relative_range=0.0, reordered=False)
            return unpruned(p, rows)
        if keep_all:  # quantization alone: SparseGPT's sweep keeping every weight
            info.update(relative_range=0.0, reordered=False)
            keep = torch.ones(Wr.shape, dtype=torch.bool, device=W.device)
            Wc = Wr.to(dtype, copy=True)
            return _sweep(p, Wc, H, None, keep, block_bounds(cols, sweep_bs), info)

        # a given scaler stands for diag(H)/2, so it scales as H
        S = wanda_score(W, H, scaler=p.like_h(scaler), dtype=dtype)
        rose_bounds = block_bounds(cols, m if n else sweep_bs if spec else blocksize)
        col_loss, block_loss = p.kernels("column_losses", S, rose_bounds, sparsity, n, m)
        block_loss = comparable_block_losses(block_loss, rose_bounds, range_rule)
        rel = relative_range(block_loss)
        reorder = rel > range_threshold
        info.update(relative_range=rel, reordered=bool(reorder), num_blocks=len(rose_bounds))

        if reorder:
            perm, sizes = rose_permutation(col_loss, block_loss, rose_bounds)
            perm = perm.to(W.device)
            Hp = H[perm][:, perm]
            Wc = Wr.to(dtype)[:, perm]
            fixed = None if mask is None else mask[:, perm]
            if n:  # whole groups moved: any multiple of M keeps groups inside one sweep block
                bounds = block_bounds(cols, sweep_bs)
            else:  # the sweep's blocks are the reordered ROSE blocks (last one may be short)
                edges = torch.tensor([0, *sizes]).cumsum(0).tolist()
                bounds = list(zip(edges[:-1], edges[1:]))
        else:
            perm, Hp, Wc = None, H, Wr.to(dtype, copy=True)
            fixed = mask
            bounds = block_bounds(cols, sweep_bs)

        info["pattern"] = pattern_name(n, m) if mask is None else "fixed mask"
        if mask is not None:
            info["sparsity"] = pruned_fraction(mask)
        return _sweep(p, Wc, Hp, perm, fixed, bounds, info)

    def _sweep(p: Problem, Wc, Hp, perm, fixed, bounds, info) -> Outcome:
        """SparseGPT's sweep of `Wc` (a copy of the rows solved, in the sweep's column order
        `perm`; modified)."""
        # One inverse per layer: the permutation depends on this layer's W (through its
        # scores), so layers sharing H (q/k/v, gate/up) get different `H[perm][:, perm]`,
        # whose factors are not permutations of each other (the Cholesky factor depends on
        # the column order). Only an unreordered layer could share the pipeline's inverse of
        # H; it is not worth a second code path, as each layer's reordering is only known here.
        inv = inverse_hessian(Hp, percdamp, dtype=p.dtype, method=inverse_method)
        info.update(inv.as_info())
        Wr = p.W if rows is None else p.W[rows]
        return swept(p, Wc, inv, bounds, fixed, spec, perm, Wr, info, rows)

    spec = as_spec(quant)

    return run_solver(
        "rose", W, H, sparsity, prune_n, prune_m, solve, backend=backend, ops=ROSE_OPS,
        inplace=inplace, check=check,
    )  # fmt: skip


def running_scaler_options(scaler: torch.Tensor | None) -> dict:
    """`rose_layer`'s keywords for the running scaler (None: none): the scaler with the ROSE
    repository's block-sum range rule, which comes with it."""
    return {} if scaler is None else {"scaler": scaler, "range_rule": "block_sum"}


def _select(
    W,
    H,
    sparsity,
    prune_n,
    prune_m,
    *,
    blocksize,
    percdamp,
    backend,
    range_threshold,
    rows,
    mask=None,
    quant=None,
    scaler=None,
    **_,
) -> PruneResult:
    """A composition's mask and weights: ROSE's, `rows` in the whole layer's column order;
    with `mask`, the OBS reconstruction on it in ROSE's column order (the hooks); `quant`:
    rounded in the same sweep; `scaler`: the running scaler (with the block-sum range rule)."""
    pat = {"sparsity": sparsity, "prune_n": prune_n, "prune_m": prune_m}
    obs = {"blocksize": blocksize, "percdamp": percdamp, "backend": backend}
    return rose_layer(
        W, H, **pat, **obs, range_threshold=range_threshold, rows=rows, mask=mask, quant=quant,
        **running_scaler_options(scaler),
    )  # fmt: skip


def _check_options(opts: dict) -> dict:
    """Method "rose"'s `score_scaler`: one of `ROSE_SCALERS`; "running" only where the pipeline can
    accumulate it in the repository's sample order (one process). A composition on ROSE's
    mask (refine=/reconstruct=) selects with it too."""
    scaler = opts["score_scaler"]
    if not isinstance(scaler, str) or scaler not in ROSE_SCALERS:
        raise ValueError(f"score_scaler must be one of {', '.join(ROSE_SCALERS)}, got {scaler!r}")
    if scaler != "running":
        return opts
    if active_world() > 1:
        raise ValueError(
            "score_scaler='running' weighs each calibration sample by its place in the "
            "calibration order, which ranks holding shards of the samples do not see: run it "
            "in one process (not under torch.distributed)"
        )
    return opts


def _layer_options(W, prune_n, prune_m, kw: dict) -> dict:
    """With the running scaler (`scaler=`, passed by the pipeline) blocks are compared by
    their loss sums, as the ROSE repository does."""
    kw.update(running_scaler_options(kw.get("scaler")))
    return kw


register(
    Method(
        "rose",
        rose_layer,
        "SparseGPT on a loss-reordered layer where the layer is columnar (ROSE)",
        {
            **solver_defaults(rose_layer, "blocksize", "percdamp", "range_threshold", "backend"),
            "score_scaler": "hessian",
        },
        # "running": the pipeline accumulates the scaler and passes the tensor as `scaler=`
        pipeline_options=("score_scaler",),
        check=_check_options,
        layer_options=_layer_options,
        reads_scaler=lambda opts: opts.get("score_scaler") == "running",
        takes_rows=True,
        takes_quant=True,
        # N:M: per group, with the whole layer's column order (which `rows=` keeps);
        # unstructured, SparseGPT's per-block threshold over all rows couples them
        select=Selection(
            _select,
            row_separable=lambda prune_n: prune_n > 0,
            takes_rows=True,
            obs_weights=True,
            reconstruct=_select,
            takes_scaler=True,
        ),  # fmt: skip
    )
)
