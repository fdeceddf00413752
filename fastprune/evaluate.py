"""Perplexity over non-overlapping windows of `seqlen` tokens (the SparseGPT/Wanda convention:
`exp(mean over windows of the window's mean next-token loss)`; equal windows, so this is the
mean over all predicted tokens)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .models import evaluating_on


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    seqlen: int,
    *,
    max_windows: int | None = None,
    batch_size: int = 1,
    device=None,
    progress: bool = False,
    desc: str = "perplexity",
) -> dict:
    """Perplexity of `model` on 1-D token ids cut into `ids.numel() // seqlen` windows (at most
    `max_windows`, the first ones). `device`: run there (the model is moved for the call and
    moved back). Returns `{'ppl', 'nll', 'windows', 'tokens', 'seqlen'}`."""
    windows = eval_windows(ids, seqlen, max_windows)
    nwin = windows.shape[0]
    total, count = 0.0, 0
    with evaluating_on(model, device) as dev:
        for s in tqdm(range(0, nwin, batch_size), desc=desc, disable=not progress, leave=False):
            x = windows[s : s + batch_size].to(dev)
            nll, n = window_nll(model(input_ids=x, use_cache=False).logits, x)
            total += nll
            count += n
    return perplexity_result(total, count, nwin, seqlen)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """`[windows, seqlen]`: the first `ids.numel() // seqlen` (at most `max_windows`)
    non-overlapping windows of the 1-D token ids."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    ids = ids.reshape(-1)
    nwin = ids.numel() // seqlen
    if max_windows is not None:
        if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
            raise ValueError(f"max_windows must be a positive integer, got {max_windows!r}")
        nwin = min(nwin, max_windows)
    if nwin == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    return ids[: nwin * seqlen].view(nwin, seqlen)


def window_nll(logits: torch.Tensor, x: torch.Tensor) -> tuple[float, int]:
    """(summed next-token negative log-likelihood, predicted tokens) of windows `x` whose
    logits are `logits`."""
    logits = logits[:, :-1].float()
    tgt = x[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"
    )
    return nll.item(), tgt.numel()


def perplexity_result(total: float, count: int, nwin: int, seqlen: int) -> dict:
    mean = total / count
    return {
        "ppl": math.exp(mean) if mean < 700 else float("inf"),
        "nll": mean,
        "windows": nwin,
        "tokens": nwin * seqlen,
        "seqlen": seqlen,
    }
