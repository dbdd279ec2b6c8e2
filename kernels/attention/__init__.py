"""Attention over the paged KV cache. `metadata.AttentionMetadata` is what the model
runner builds once per step; backends read it and never see requests."""

from kernels.attention.metadata import AttentionMetadata
from kernels.attention.torch_paged import TorchPagedAttention

__all__ = ["AttentionMetadata", "TorchPagedAttention", "get_attention_backend"]

_BACKENDS = {"torch": TorchPagedAttention}


def get_attention_backend(name: str):
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(_BACKENDS)}")
    return _BACKENDS[name]
