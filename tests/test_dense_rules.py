"""Matrices of a decoder block that are no GEMM weights (convolution kernels of SSM and
linear-attention mixers, SSM state, norm and clip scales, bias tables, vectors stored with
singleton dimensions, small mixing matrices, expert stacks in layouts no rule reads) and
routers (by their class, their name or the module they sit in) are left dense with their
reason, on the blocks of real transformers families built on the meta device; a parameter
that could be a GEMM weight and has no rule is still an error naming it."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from fastprune.models import find_blocks
from fastprune.pipeline import block_layers as bl
from fastprune.pipeline.block_layers import find_block_layers

transformers = pytest.importorskip("transformers")


def meta_blocks(family: str):
    """The decoder blocks of `family` with its default config cut to two blocks, on meta."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if family not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    cfg = transformers.AutoConfig.for_model(family)
    cfg.num_hidden_layers = 2
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:2]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return find_blocks(model)[1]


def reasons(block) -> dict[str, str]:
    return {d.name: d.reason for d in find_block_layers(block).dense}


@pytest.mark.parametrize(
    ("family", "want"),
    [
        ("qwen3_next", {"linear_attn.conv1d.weight": bl.CONV_KERNEL, "mlp.gate.weight": "router"}),
        ("nemotron_h", {"mixer.conv1d.weight": bl.CONV_KERNEL}),
        ("granitemoehybrid", {"mamba.conv1d.weight": bl.CONV_KERNEL}),
        ("lfm3", {"conv.conv.weight": bl.CONV_KERNEL}),
        (
            "jetmoe",
            {
                "mlp.router.layer.weight": "router",
                "self_attention.experts.router.layer.weight": "router",
                "mlp.input_linear.weight": bl.UNREAD_EXPERTS,
            },
        ),
        ("rwkv", {"attention.time_mix_key": bl.VECTOR}),
        (
            "deepseek_v4",
            {"attn_hc.fn": bl.MIXING, "self_attn.compressor.position_bias": bl.TABLE},
        ),
        ("inkling2_text", {"self_attn.q_proj.norm.scale": bl.NORM_SCALE}),
    ],
)
def test_families_blocks_leave_non_gemm_matrices_dense(family, want):
    blocks = meta_blocks(family)
    got = {}
    for b in blocks:
        got |= reasons(b)
    assert {k: got.get(k) for k in want} == want
    pruned = set().union(*(find_block_layers(b).layers for b in blocks))
    assert not pruned & {k.rsplit(".", 1)[0] for k in want}  # none of them is also pruned


def test_a_pointwise_convolution_is_no_kernel_rule():
    """A kernel-size-1, ungrouped convolution is a GEMM: no rule leaves it dense."""
    block = nn.Module()
    block.proj = nn.Linear(8, 8)
    block.pw = nn.Conv1d(8, 16, kernel_size=1)
    block.dw = nn.Conv1d(8, 8, kernel_size=4, groups=8)
    with pytest.raises(ValueError, match=r"parameter pw.weight \[16, 8, 1\].*ignore=\['pw"):
        find_block_layers(block)
    assert reasons_of(find_block_layers(block, ignore=["pw.weight"])) == {
        "pw.weight": "ignored (ignore=)",
        "dw.weight": bl.CONV_KERNEL,
    }


def reasons_of(layers) -> dict[str, str]:
    return {d.name: d.reason for d in layers.dense}


def test_an_unknown_matrix_that_could_be_a_gemm_weight_is_an_error():
    block = nn.Module()
    block.proj = nn.Linear(64, 64)
    block.mystery = nn.Parameter(torch.zeros(64, 64))
    with pytest.raises(ValueError, match=r"block: parameter mystery \[64, 64\] .* no rule"):
        find_block_layers(block)


def test_rules_by_structure():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_proj = nn.Linear(32, 64)
            self.A_log = nn.Parameter(torch.zeros(64, 16))
            self.mix = nn.Parameter(torch.zeros(4, 32))  # hyper-connection style, 4 rows
            self.gain = nn.Parameter(torch.zeros(1, 1, 32))
            self.rel_bias = nn.Parameter(torch.zeros(40, 40))
            self.pos = nn.Embedding(40, 4)

    class TopKGating(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(32, 8)

    block = nn.Module()
    block.mixer = Mixer()
    block.router = TopKGating()
    got = reasons_of(find_block_layers(block))
    assert got == {
        "mixer.A_log": bl.SSM_STATE,
        "mixer.mix": bl.MIXING,
        "mixer.gain": bl.VECTOR,
        "mixer.rel_bias": bl.TABLE,
        "mixer.pos.weight": bl.TABLE,
        "router.layer.weight": "router",
    }
    assert list(find_block_layers(block).layers) == ["mixer.in_proj"]
    kinds = collections.Counter(got.values())
    assert kinds["router"] == 1
