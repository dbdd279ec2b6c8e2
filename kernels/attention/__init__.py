"""Attention over the paged KV cache. `metadata.AttentionMetadata` is what the model
runner builds once per step; backends read it and never see requests."""

from __future__ import annotations

import logging

import torch

from kernels.attention.flashinfer_backend import (
    FlashInferAttention,
    flashinfer_unavailable_reason,
)
from kernels.attention.metadata import AttentionMetadata
from kernels.attention.torch_paged import TorchPagedAttention

__all__ = [
    "AttentionMetadata",
    "FlashInferAttention",
    "TorchPagedAttention",
    "get_attention_backend",
    "resolve_attention_backend",
]

log = logging.getLogger(__name__)

_BACKENDS = {"torch": TorchPagedAttention, "flashinfer": FlashInferAttention}
CHOICES = ("auto", *_BACKENDS)


def get_attention_backend(name: str):
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def resolve_attention_backend(name: str, head_dim: int, device: torch.device,
                              dtype: torch.dtype) -> str:
    """'auto' picks FlashInfer where it can run and says why not otherwise; an explicit
    'flashinfer' that cannot run is an error naming the reason, never a silent fallback."""
    if name not in CHOICES:
        raise ValueError(f"--attention-backend: unknown {name!r}; choose from {CHOICES}")
    if name == "torch":
        return name
    reason = flashinfer_unavailable_reason(head_dim, device, dtype)
    if reason is None:
        return "flashinfer"
    if name == "flashinfer":
        raise ValueError(f"--attention-backend flashinfer: {reason}")
    if device.type == "cuda":
        log.warning("attention: torch reference path (%s)", reason)
    return "torch"
