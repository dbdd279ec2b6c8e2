"""Named model shapes that `baton make-model` can write as random-weight checkpoints.

Tiny presets keep every CPU test fast while still exercising what differs between
families (GQA, llama3 RoPE scaling, q/k/v bias, q/k norm, head_dim != hidden/heads,
tied and untied heads). Real-shape presets exist so GPU benchmarks run the true
memory and FLOP profile without downloading gated weights.

`hf_config` is a classic Hugging Face `config.json` (`rope_theta` + `rope_scaling`,
`torch_dtype`) without token ids: the checkpoint writer fills `bos_token_id` and
`eos_token_id` from the tokenizer it builds, so the two can never disagree.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

from kernels.errors import BatonError

Family = Literal["llama3", "qwen", "mistral"]


class UnknownPresetError(BatonError, ValueError):
    """A preset name that is not in `PRESETS`; the message lists the valid ones."""


@dataclass(frozen=True)
class Preset:
    """One model shape. `hf_config` is shared by every caller: read it, or take a mutable
    copy with `config_dict()`; never edit it in place."""

    name: str
    family: Family
    hf_config: dict[str, Any]
    description: str

    def config_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.hf_config)


_COMMON = {
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
}


def _llama3_rope(original_max: int) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max,
    }


def _llama(
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    inter: int,
    vocab: int,
    max_pos: int,
    original_max: int,
    tie: bool,
    dtype: str,
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_COMMON,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": _llama3_rope(original_max),
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": tie,
        "torch_dtype": dtype,
    }


def _qwen3(
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    inter: int,
    vocab: int,
    max_pos: int,
    tie: bool,
    dtype: str,
) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **_COMMON,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "tie_word_embeddings": tie,
        "torch_dtype": dtype,
    }


_TINY_QWEN2 = {
    # Qwen2 has no `attention_bias` field: its q/k/v projections always carry a bias.
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    **_COMMON,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}

_TINY_MISTRAL = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    **_COMMON,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "intermediate_size": 160,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

_TINY_LLAMA = dict(
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    inter=128,
    vocab=1024,
    max_pos=4096,
    original_max=256,
    dtype="float32",
)
_LLAMA_8B = dict(
    hidden=4096,
    layers=32,
    heads=32,
    kv_heads=8,
    inter=14336,
    vocab=128256,
    max_pos=131072,
    original_max=8192,
    tie=False,
    dtype="bfloat16",
)
_LLAMA_70B = {**_LLAMA_8B, "hidden": 8192, "layers": 80, "heads": 64, "inter": 28672}


def _preset(name: str, family: Family, hf: dict[str, Any], description: str) -> Preset:
    return Preset(name=name, family=family, hf_config=hf, description=description)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset(
            "tiny-llama",
            "llama3",
            _llama(**_TINY_LLAMA, tie=True),
            "Llama 3 architecture, 2 layers, GQA 4:2, llama3 RoPE scaling, tied head",
        ),
        _preset(
            "tiny-llama-untied",
            "llama3",
            _llama(**_TINY_LLAMA, tie=False),
            "tiny-llama with a separate lm_head",
        ),
        _preset(
            "tiny-qwen2",
            "qwen",
            _TINY_QWEN2,
            "Qwen2 architecture, 2 layers, GQA 4:2, q/k/v bias, tied head",
        ),
        _preset(
            "tiny-qwen3",
            "qwen",
            _qwen3(
                hidden=64,
                layers=2,
                heads=4,
                kv_heads=2,
                head_dim=32,
                inter=128,
                vocab=1024,
                max_pos=4096,
                tie=True,
                dtype="float32",
            ),
            "Qwen3 architecture, 2 layers, q/k norm, head_dim 32 != hidden/heads",
        ),
        _preset(
            "tiny-mistral",
            "mistral",
            _TINY_MISTRAL,
            "Mistral architecture, 2 layers, MQA (1 kv head), untied head",
        ),
        _preset(
            "small-llama",
            "llama3",
            _llama(hidden=256, layers=4, heads=8, kv_heads=8, inter=512, vocab=1024,
                   max_pos=32768, original_max=8192, tie=True, dtype="float32"),
            "CPU benchmark shape: 4 layers, 8 KiB of KV per token, 32k context",
        ),
        _preset(
            "mini-llama",
            "llama3",
            _llama(hidden=1024, layers=4, heads=8, kv_heads=2, inter=2816, vocab=4096,
                   max_pos=8192, original_max=8192, tie=True, dtype="bfloat16"),
            "GPU test shape: the 8B model's head_dim 128 and 4:1 GQA in 4 small layers; "
            "tied head (as Llama 3.2 1B/3B) for peaked logits",
        ),
        _preset(
            "mini-llama-wide",
            "llama3",
            _llama(hidden=2048, layers=4, heads=16, kv_heads=8, inter=5632, vocab=4096,
                   max_pos=8192, original_max=8192, tie=True, dtype="bfloat16"),
            "GPU test shape for TP up to 8: mini-llama with 8 kv heads (2:1 GQA), head_dim 128",
        ),
        _preset(
            "llama-3.1-8b",
            "llama3",
            _llama(**_LLAMA_8B),
            "Llama 3.1 8B shapes, random bf16 weights (~16 GB)",
        ),
        _preset(
            "qwen3-8b",
            "qwen",
            _qwen3(
                hidden=4096,
                layers=36,
                heads=32,
                kv_heads=8,
                head_dim=128,
                inter=12288,
                vocab=151936,
                max_pos=40960,
                tie=False,
                dtype="bfloat16",
            ),
            "Qwen3 8B shapes, random bf16 weights (~16 GB)",
        ),
        _preset(
            "llama-3.1-70b",
            "llama3",
            _llama(**_LLAMA_70B),
            "Llama 3.1 70B shapes, random bf16 weights (~141 GB)",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; the error lists every valid name so the CLI can show it."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
