"""Rotary position embedding (neox/HF "rotate_half" style), with Llama 3 frequency scaling.

cos/sin are tabulated once for every position up to max_position_embeddings and
indexed by each token's absolute position, so chunked prefill and decode need no
per-step recomputation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.config import RopeScaling
from kernels.layers import fused


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, smooth in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: RopeScaling | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = inv_frequencies(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        # [max_positions, head_dim // 2] each; float32 so bf16 models rotate like HF.
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.use_fused_kernels = False  # kernels.layers.fused.enable() turns it on
        self._cos_sin: torch.Tensor | None = None  # [positions, head_dim] for the fused path

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D], positions: [T]."""
        if self.use_fused_kernels:
            t = q.shape[0]
            qf, kf = q.reshape(t, -1), k.reshape(t, -1)  # views when rows are packed
            fused.rope_(positions, qf, kf, self.head_dim, self.cos_sin_table())
            return qf.view_as(q), kf.view_as(k)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


    def cos_sin_table(self) -> torch.Tensor:
        """[max_positions, head_dim] float32, cos | sin halves: the fused kernels' table."""
        if self._cos_sin is None or self._cos_sin.device != self.cos.device:
            self._cos_sin = torch.cat([self.cos, self.sin], dim=-1).contiguous()
        return self._cos_sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x1, x2 = x.float().chunk(2, dim=-1)
    # Same op order as HF: (x * cos) + (rotate_half(x) * sin) with cos/sin duplicated.
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(dtype)
