"""Plain-PyTorch attention over paged blocks: the CPU path and the GPU oracle.

Cache layout seen by one layer: [num_blocks, 2, block_size, num_kv_heads, head_dim]
(FlashInfer's NHD paged layout); the view may be strided over blocks because the
engine keeps all layers of a block together (docs/kv_layout.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention.metadata import AttentionMetadata


class TorchPagedAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_layer: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] for the new tokens. Returns [T, Hq, D]."""
        write_kv(kv_layer, k, v, meta)
        if meta.is_decode_only:
            return self._decode(q, kv_layer, meta)
        return self._prefill(q, kv_layer, meta)

    def _prefill(self, q: torch.Tensor, kv_layer: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        bs = meta.block_size
        start = 0
        for i, (qlen, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            nb = -(-ctx // bs)
            blocks = meta.block_tables[i, :nb]
            k = kv_layer[blocks, 0].reshape(nb * bs, self.num_kv_heads, self.head_dim)[:ctx]
            v = kv_layer[blocks, 1].reshape(nb * bs, self.num_kv_heads, self.head_dim)[:ctx]
            # Query r sits at absolute position ctx - qlen + r and sees keys 0..that position.
            q_pos = torch.arange(ctx - qlen, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(
                q[start : start + qlen].transpose(0, 1),  # [Hq, L, D]
                k.transpose(0, 1), v.transpose(0, 1),
                attn_mask=mask, scale=self.scale, enable_gqa=True,
            )
            out[start : start + qlen] = o.transpose(0, 1)
            start += qlen
        return out

    def _decode(self, q: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        bs = meta.block_size
        max_ctx = max(meta.seq_lens_cpu)
        nb = -(-max_ctx // bs)
        tables = meta.block_tables[:, :nb]
        b = tables.shape[0]
        k = kv_layer[tables, 0].reshape(b, nb * bs, self.num_kv_heads, self.head_dim)
        v = kv_layer[tables, 1].reshape(b, nb * bs, self.num_kv_heads, self.head_dim)
        mask = torch.arange(nb * bs, device=q.device)[None, :] < meta.seq_lens[:, None]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, Hq, 1, D]
            k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask[:, None, None, :], scale=self.scale, enable_gqa=True,
        )
        return o.squeeze(2)


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttentionMetadata) -> None:
    if meta.slot_blocks is None:
        meta.split_slots()
    kv_layer[meta.slot_blocks, 0, meta.slot_offsets] = k.to(kv_layer.dtype)
    kv_layer[meta.slot_blocks, 1, meta.slot_offsets] = v.to(kv_layer.dtype)
