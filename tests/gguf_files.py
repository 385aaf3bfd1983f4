"""Write a tiny model as a GGUF file (float32 tensors, llama.cpp names and conventions) with the byte
tokenizer, so that GGUF input is tested without a download. Only what transformers' GGUF loader reads
back: the architecture's metadata keys (``transformers.integrations.ggml.GGUF_CONFIG_MAPPING``
inverted), the tensor names of gguf's own name map, and the two tensor conventions llama.cpp's converter
applies (Llama's rotary permutation of q/k rows, Gemma's norm weights stored as 1 + w)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# model_type -> (key of transformers' GGUF config mapping, GGUF architecture name), where they differ
GGUF_NAMES = {"gemma3_text": ("gemma3", "gemma3"), "qwen2_moe": ("qwen2_moe", "qwen2moe"),
              "qwen3_moe": ("qwen3_moe", "qwen3moe"), "mistral": ("llama", "llama")}


# Expert sizes as llama.cpp's converter writes them (the keys lrcompress.models.gguf reads back).
EXPERT_SIZES = {"expert_feed_forward_length": "moe_intermediate_size",
                "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary (the inverse of transformers' reverse permutation)."""
    dim = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, dim, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, tokenizer, path: Path) -> Path:
    import gguf
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    config = model.config
    mapping, arch = GGUF_NAMES.get(config.model_type, (config.model_type, config.model_type))
    writer = gguf.GGUFWriter(str(path), arch)
    for key, attribute in GGUF_CONFIG_MAPPING[mapping].items():
        value = getattr(config, attribute, None) if attribute else None
        if attribute == "rope_theta":
            value = (config.rope_parameters.get("full_attention", config.rope_parameters) or {}).get("rope_theta")
        if isinstance(value, bool) or value is None:
            continue
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(f"{arch}.{key}", value)
    for key, attribute in EXPERT_SIZES.items():      # llama.cpp writes these; transformers' mapping omits them
        if getattr(config, attribute, None):
            writer.add_uint32(f"{arch}.{key}", getattr(config, attribute))
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_scores([0.0] * len(tokens))          # no merges: every byte is one token
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        token_id = getattr(config, f"{kind}_token_id", None) if token_id is None else token_id
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        weight = tensor.detach().to(torch.float32).numpy().copy()
        if name.endswith("mlp.experts.gate_up_proj"):        # llama.cpp stores gate and up apart
            block = f"blk.{name.split('.')[2]}"
            gate, up = np.split(weight, 2, axis=1)
            writer.add_tensor(f"{block}.ffn_gate_exps.weight", gate.copy())
            writer.add_tensor(f"{block}.ffn_up_exps.weight", up.copy())
            continue
        if name.endswith("mlp.experts.down_proj"):           # a fused parameter, not a Linear's weight
            writer.add_tensor(f"blk.{name.split('.')[2]}.ffn_down_exps.weight", weight)
            continue
        base, _, suffix = name.rpartition(".")
        target = names.get_name(base)
        if target is None:
            continue
        if target.endswith("ffn_gate_inp_shexp"):
            weight = weight.reshape(-1)
        if arch == "llama" and target.endswith(("attn_q", "attn_k")):
            weight = _permute(weight, config.num_attention_heads if target.endswith("attn_q")
                              else config.num_key_value_heads)
        if arch.startswith("gemma") and suffix == "weight" and target.endswith("norm"):
            weight = weight + 1
        writer.add_tensor(f"{target}.{suffix}", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
