"""Tiny randomly initialised causal LMs of every supported family (built from configs, no
downloads) and a byte-level tokenizer, for the pipeline and CLI tests."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 256
FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "opt", "gpt2")


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, max_position_embeddings=128)
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    if family == "mistral":
        return transformers.MistralConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    if family == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    if family == "gemma":
        return transformers.GemmaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            **common,
        )
    if family in ("gemma2", "gemma3"):
        # sliding and full attention blocks get different masks (window 8 < calibration
        # length), Gemma-3 also different rotary embeddings; its first full block is block 2
        cls = transformers.Gemma2Config if family == "gemma2" else transformers.Gemma3TextConfig
        types = ["sliding_attention", "full_attention"] * 2
        if family == "gemma3":
            types = [
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ]
        return cls(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            layer_types=types,
            **common,
        )
    if family == "opt":
        return transformers.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            **common,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128
        )
    raise ValueError(family)


MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss")


def tiny_moe_config(family: str, experts: int = 4, top_k: int = 2):
    """Two MoE blocks of `experts` experts, top-`top_k` (DeepSeek-V3: a dense block first,
    then two MoE blocks with a shared expert; Qwen2-MoE: a shared expert and its gate)."""
    common = dict(
        vocab_size=VOCAB,
        max_position_embeddings=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=top_k,
    )
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=32, num_local_experts=experts, **common)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            intermediate_size=64, moe_intermediate_size=32, num_experts=experts, head_dim=16,
            **common,
        )  # fmt: skip
    if family == "olmoe":
        return transformers.OlmoeConfig(intermediate_size=32, num_experts=experts, **common)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            num_experts=experts, **common,
        )  # fmt: skip
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(
            intermediate_size=64, moe_intermediate_size=32, n_routed_experts=experts,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
            kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, **{**common, "num_hidden_layers": 3},
        )  # fmt: skip
    if family == "gpt_oss":
        return transformers.GptOssConfig(
            intermediate_size=32, num_local_experts=experts, head_dim=16, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], **common,
        )  # fmt: skip
    raise ValueError(family)


def tiny_moe_model(family: str, seed: int = 0, **kw):
    """A tiny MoE model from transformers' own classes, weights as `tiny_model`'s."""
    torch.manual_seed(seed)
    cfg = tiny_moe_config(family, **kw)
    cfg.initializer_range = 0.2
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.float().eval()


def tiny_model(family: str, seed: int = 0):
    """A tiny model with weights large enough that pruning visibly changes its outputs."""
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg.initializer_range = 0.2
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.float().eval()


def byte_tokenizer():
    """A byte-level BPE tokenizer with 256 tokens and no merges (built offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=alphabet[0])


def calib_ids(n: int = 4, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)
