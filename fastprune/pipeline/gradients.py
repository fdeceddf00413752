"""GBLM's gradient norms `G` from real backward passes over the calibration samples."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..layers import as_matrix, get_weight, layer_kind
from ..models import model_device
from ..solvers.gblm import GradientNormAccumulator
from .block_layers import resolve_layer
from .experts import ExpertProjection


def compute_gradient_norms(
    model,
    calib: torch.Tensor,
    names: list[str],
    device=None,
    norm: str = "l2",
    scale: float = 100.0,
    progress: bool = False,
    finalize: bool = True,
) -> dict[str, torch.Tensor]:
    """GBLM's `G` per named layer (`[out, in]`, float32, on CPU; an expert of a fused MoE
    parameter named `...mlp.experts.down_proj[3]` gets its slice): one backward pass per
    calibration sample through the whole model (on `device`), the language-modelling loss on
    the sample itself; each weight's gradient is folded into its l1/l2 accumulator by a hook
    and freed at once, so at most one gradient per weight exists at any time.

    `finalize=False` returns the raw float32 sums instead (`sum_s (scale*g_s)^2` for l2,
    `sum_s |scale*g_s|` for l1), which add exactly over disjoint sample sets: the
    distributed pipeline sums the ranks' and takes the l2 square root itself."""
    home = model_device(model)
    dev = torch.device(device) if device is not None else home
    layers = {n: resolve_layer(model, n) for n in names}
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    accs, handles = {}, []
    if dev != home:
        model.to(dev)
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        # one hook per parameter: a linear's weight, or a fused expert parameter whose
        # gradient [E, ...] is folded slice by slice into each expert's accumulator
        folds: dict[int, tuple[torch.Tensor, list]] = {}
        for n, layer in layers.items():
            kind = layer_kind(layer)
            acc = GradientNormAccumulator(tuple(get_weight(layer, kind).shape), dev, norm, scale)
            accs[n] = acc
            if isinstance(layer, ExpertProjection):
                w, index = getattr(layer.experts.module, layer.proj), layer.index
            else:
                w, index = layer.weight, None
            folds.setdefault(id(w), (w, []))[1].append((acc, kind, index))
        for w, targets in folds.values():
            w.requires_grad_(True)

            def fold(p, targets=targets):
                for acc, kind, index in targets:
                    acc.add(as_matrix(p.grad if index is None else p.grad[index], kind))
                p.grad = None

            handles.append(w.register_post_accumulate_grad_hook(fold))
        for i in tqdm(range(calib.shape[0]), desc="gblm gradients", disable=not progress):
            x = calib[i : i + 1].to(dev)
            with torch.enable_grad():
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, rg in saved.items():
            p.requires_grad_(rg)
            p.grad = None
        if dev != home:
            model.to(home)
        model.train(was_training)
    return {n: (a.G if finalize else a.acc).cpu() for n, a in accs.items()}
