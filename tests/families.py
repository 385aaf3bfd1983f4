"""Every supported decoder family as a tiny random model (no download), with the settings that make
its layers differ: sliding windows shorter than the test windows, mixed ``layer_types``, Granite's
multipliers. Window length ``SEQ`` exceeds every sliding window, so a wrong mask shows."""
from __future__ import annotations

import torch

from helpers import tiny_model
from moe_helpers import MOE_FAMILIES, tiny_moe

SEQ = 24
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
SLIDING = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)

DENSE_FAMILIES: dict[str, dict] = {
    "llama": dict(),
    "mistral": dict(sliding_window=8),
    "qwen2": dict(SLIDING),
    "qwen3": dict(SLIDING),
    "gemma": dict(),
    "gemma2": dict(sliding_window=8),
    "gemma3_text": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
                        num_hidden_layers=4),
    "phi3": dict(SPECIAL_IDS),
    "olmo2": dict(SPECIAL_IDS),
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0, attention_multiplier=0.2),
}

FAMILIES = [*DENSE_FAMILIES, *MOE_FAMILIES]

# The families transformers dequantizes from GGUF, in settings a GGUF file can express: its metadata has
# no sliding-window layer selection for Mistral (written as llama.cpp does, as a Llama) or Qwen2/3, no
# head_dim for Qwen3 (transformers' default 128 applies) and no layer_types for Gemma 3 (the default
# pattern applies).
GGUF_FAMILIES: dict[str, dict] = {
    "llama": dict(),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(),
    "qwen3": dict(head_dim=128),
    "phi3": dict(SPECIAL_IDS),
    "gemma2": dict(sliding_window=8),
    "gemma3_text": dict(sliding_window=8),
    "qwen2_moe": dict(),      # MoE families are built by tiny_moe; their expert sizes travel in the
    "qwen3_moe": dict(),      # expert_*feed_forward_length keys (lrcompress.models.gguf reads them)
}


def family_model(family: str, seed: int = 0, gguf: bool = False):
    """A tiny random model of ``family`` (hidden 32-64, 2-4 layers), in eval mode; ``gguf``: in the
    settings of ``GGUF_FAMILIES``."""
    if family in MOE_FAMILIES:
        return tiny_moe(family, seed=seed)
    return tiny_model(family, seed=seed, **{**SMALL, **(GGUF_FAMILIES if gguf else DENSE_FAMILIES)[family]})


def family_windows(count: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (count, SEQ), generator=torch.Generator().manual_seed(seed))


def save_family(directory, family: str):
    """``family_model(family)`` saved as safetensors with the byte tokenizer."""
    from helpers import byte_tokenizer

    family_model(family).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory
