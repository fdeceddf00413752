"""Calibration and evaluation text: built-in (no download), text files, token tensors, and
`wikitext2` / `c4` through the `datasets` package where the hub is reachable.

Built-in text is the documentation CPython ships in `pydoc_data.topics` (the `help()` topics):
topics sorted by name, every 4th one (indices 3, 7, 11, ...) is evaluation text, the rest is
calibration text; evaluation paragraphs that also occur in calibration text are dropped, so
the two never overlap.
"""

from __future__ import annotations

from pathlib import Path

import torch

BUILTIN = "builtin"
DATASETS = ("wikitext2", "c4")
EVAL_EVERY = 4  # every 4th built-in topic is held out for evaluation
# SparseGPT's calibration set: this many windows of this many tokens
DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048


def builtin_text(split: str = "calibration") -> str:
    """The built-in text for `split` ('calibration' or 'eval'). Topics are split by index;
    the help topics repeat some passages (grammar snippets), so any paragraph of a held-out
    topic that also occurs in calibration text is dropped from the evaluation text."""
    if split not in ("calibration", "eval"):
        raise ValueError(f"split must be 'calibration' or 'eval', got {split!r}")
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held = [i % EVAL_EVERY == EVAL_EVERY - 1 for i in range(len(keys))]
    calib = "\n\n".join(topics[k].strip() for k, h in zip(keys, held) if not h)
    if split == "calibration":
        return calib
    paras = []
    for k, h in zip(keys, held):
        if h:
            paras += [p for p in topics[k].strip().split("\n\n") if p.strip() not in calib]
    return "\n\n".join(paras)


def read_text_file(path, what: str = "calibration") -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{what} file {str(path)!r} does not exist")
    if not p.is_file():
        raise ValueError(f"{what} file {str(path)!r} is not a regular file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} file {str(path)!r} cannot be read as UTF-8 text: {e}") from e
    if not text.strip():
        raise ValueError(f"{what} file {str(path)!r} is empty")
    if "\x00" in text:
        raise ValueError(f"{what} file {str(path)!r} contains NUL bytes: not a text file")
    return text


def dataset_text(name: str, split: str) -> str:
    """`wikitext2` / `c4` text through `datasets` (the SparseGPT/Wanda splits); a clear error
    when the package is missing or the hub cannot be reached."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError(
            f"{name!r} needs the 'datasets' package and hub access (pip install datasets); "
            "use 'builtin' or a text file offline"
        ) from e
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset(
                "wikitext", "wikitext-2-raw-v1", split="train" if split == "calibration" else "test"
            )
            return "\n\n".join(ds["text"])
        if split == "calibration":
            files = {"train": "en/c4-train.00000-of-01024.json.gz"}
            ds = datasets.load_dataset("allenai/c4", data_files=files, split="train")
        else:
            files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
            ds = datasets.load_dataset("allenai/c4", data_files=files, split="validation")
            return " ".join(ds[:1100]["text"])  # the SparseGPT/Wanda c4 eval slice
        return "\n\n".join(ds[:20000]["text"])
    except Exception as e:  # network / hub errors come in many types
        raise ValueError(
            f"could not load dataset {name!r} (is the Hugging Face hub reachable?): "
            f"{type(e).__name__}: {e}"
        ) from e


def text_for(spec, split: str) -> str:
    """Text for a calibration/eval spec: 'builtin', a dataset name, a file path, a string list."""
    what = "calibration" if split == "calibration" else "eval"
    if isinstance(spec, list | tuple):
        if not spec or not all(isinstance(s, str) for s in spec):
            raise TypeError(f"{what} list must be a non-empty list of strings")
        return "\n\n".join(spec)
    if isinstance(spec, Path):
        return read_text_file(spec, what)
    if not isinstance(spec, str):
        raise TypeError(
            f"{what} must be a LongTensor of token ids, a list of strings, a file path, "
            f"'builtin', 'wikitext2' or 'c4'; got {type(spec).__name__}"
        )
    if spec == BUILTIN:
        return builtin_text(split)
    if spec in DATASETS:
        return dataset_text(spec, split)
    return read_text_file(spec, what)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of token ids (no special tokens; long text tokenized in one go)."""
    if tokenizer is None:
        raise ValueError("text calibration/evaluation needs a tokenizer (pass tokenizer=...)")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random offsets (SparseGPT's sampling), seeded
    by a local generator (the global RNG is untouched)."""
    if ids.numel() <= seqlen:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than seqlen + 1 = {seqlen + 1}"
        )
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def check_token_tensor(calib: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    if calib.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"calibration tensor must hold integer token ids, got {calib.dtype}")
    if calib.dim() == 1:
        calib = calib.unsqueeze(0)
    if calib.dim() != 2 or calib.numel() == 0:
        raise ValueError(f"calibration tensor must be [nsamples, seqlen], got {tuple(calib.shape)}")
    if calib.min().item() < 0 or (vocab_size and calib.max().item() >= vocab_size):
        raise ValueError(f"calibration token ids must lie in [0, {vocab_size})")
    return calib.long()


def get_calibration(
    calibration,
    tokenizer=None,
    nsamples: int = DEFAULT_NSAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = 0,
) -> torch.Tensor:
    """`[nsamples, seqlen]` token ids. A LongTensor is used as given (not copied in place);
    text (list of strings, file, 'builtin', dataset name) is tokenized and sampled."""
    if isinstance(calibration, torch.Tensor):
        return check_token_tensor(calibration)
    for name, v in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    text = text_for(calibration, "calibration")
    return sample_windows(tokenize(tokenizer, text), nsamples, seqlen, seed)


def get_eval_ids(spec, tokenizer=None) -> torch.Tensor:
    """1-D token ids of the evaluation text ('builtin' = the held-out built-in topics)."""
    if isinstance(spec, torch.Tensor):
        return check_token_tensor(spec).reshape(-1)
    return tokenize(tokenizer, text_for(spec, "eval"))
