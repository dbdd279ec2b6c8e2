"""Architecture name -> model class, and the checkpoint's parameter names for a config."""

from __future__ import annotations

import torch

from kernels.attention import get_attention_backend
from kernels.config import ModelConfig
from kernels.models.decoder import DecoderForCausalLM
from kernels.parallel import ParallelContext


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama 2 / 3.x (Llama 3 RoPE scaling comes from the config)."""


class MistralForCausalLM(DecoderForCausalLM):
    """Mistral without sliding window (rejected in ModelConfig until supported)."""


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2 / 2.5: q/k/v projections carry a bias (config.attention_bias)."""


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3 dense: per-head RMSNorm on q and k before RoPE (config.qk_norm)."""


ARCHITECTURES: dict[str, type[DecoderForCausalLM]] = {
    cls.__name__: cls
    for cls in (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)
}


def build_model(cfg: ModelConfig, pc: ParallelContext | None = None,
                attention_backend: str = "torch",
                device: torch.device | str = "cpu") -> DecoderForCausalLM:
    """Builds the module tree with uninitialised weights directly on `device`."""
    backend_cls = get_attention_backend(attention_backend)
    with torch.device(device):
        return ARCHITECTURES[cfg.architecture](cfg, pc or ParallelContext(), backend_cls)


def hf_param_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this config holds, with its full shape."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes[p + "self_attn.q_proj.weight"] = (cfg.q_size, h)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.kv_size, h)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.kv_size, h)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (cfg.q_size,)
            shapes[p + "self_attn.k_proj.bias"] = (cfg.kv_size,)
            shapes[p + "self_attn.v_proj.bias"] = (cfg.kv_size,)
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.q_size)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes
