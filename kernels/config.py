"""Architecture-neutral model config, normalised once from a Hugging Face config.json.

Every layer reads only this dataclass, so adding an architecture means teaching
`ModelConfig.from_hf` its field names, not touching the layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels.errors import CheckpointError, UnsupportedArchitectureError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling; `None` on ModelConfig means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    dtype: torch.dtype = torch.float32
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V for one token across all layers (the unit of KV transfer cost)."""
        itemsize = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.num_layers * self.kv_size * itemsize

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            attn += 2 * self.head_dim
        layer = attn + 3 * h * i + 2 * h
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Raises UnsupportedArchitectureError, KeyError for a missing field and ValueError
        (naming the field) for a bad one; `from_dir` turns the last two into
        CheckpointError with the file's path."""
        if not isinstance(hf, dict):
            raise ValueError(f"expected a JSON object, got {type(hf).__name__}")
        archs = hf.get("architectures") or []
        arch = archs if isinstance(archs, str) else archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"config.json declares architecture {arch!r}; Baton supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if hf.get("use_sliding_window") or (
            arch == "MistralForCausalLM" and hf.get("sliding_window") is not None
        ):
            raise UnsupportedArchitectureError(
                "sliding-window attention is not supported yet (config.json sets "
                f"sliding_window={hf.get('sliding_window')!r}); set it to null"
            )
        num_heads = _positive_int(hf, "num_attention_heads")
        hidden = _positive_int(hf, "hidden_size")
        head_dim = _positive_int(hf, "head_dim", hidden // num_heads)
        num_kv_heads = _positive_int(hf, "num_key_value_heads", num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of "
                             f"num_key_value_heads={num_kv_heads}")
        rope_theta, scaling = _parse_rope(hf)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype_name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"config.json torch_dtype {dtype_name!r} is not supported")
        return cls(
            architecture=arch,
            hidden_size=hidden,
            num_layers=_positive_int(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=_positive_int(hf, "intermediate_size"),
            vocab_size=_positive_int(hf, "vocab_size"),
            max_position_embeddings=_positive_int(hf, "max_position_embeddings", 4096),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch == "Qwen3ForCausalLM",
            dtype=_DTYPES[dtype_name],
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: is {model_dir} a Hugging Face checkpoint?")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf(hf)
        except KeyError as e:
            raise CheckpointError(f"{path} lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None


_MISSING = object()


def _positive_int(hf: dict, key: str, default: object = _MISSING) -> int:
    """hf[key] (KeyError when absent and no default; null counts as absent) as an int >= 1."""
    value = hf.get(key)
    if value is None:
        if default is _MISSING:
            raise KeyError(key)
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"field {key!r} must be a positive integer, got {value!r}")
    return value


def _parse_rope(hf: dict) -> tuple[float, RopeScaling | None]:
    """Accept both the classic (`rope_theta` + `rope_scaling`) and transformers 5
    (`rope_parameters`) spellings."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedArchitectureError(f"rope type {rope_type!r} is not supported yet")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
