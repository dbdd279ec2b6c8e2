"""Per-step attention metadata: where each new token's K/V goes, and which blocks each
sequence reads. Built once per step by the model runner, shared by all layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    # [num_tokens] flat slot (block_id * block_size + offset) for each new token's K/V.
    slot_mapping: torch.Tensor
    # [num_seqs, max_blocks] block ids per sequence, padded with 0.
    block_tables: torch.Tensor | None
    # [num_seqs] tokens in context after this step (cached prefix + new tokens).
    seq_lens: torch.Tensor | None
    # Host copies: the reference path loops over sequences with them.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    # Backend state planned once per step (FlashInfer's wrapper); None for torch.
    plan: Any = None
    # slot_mapping split into (block, offset) by split_slots(), once per forward pass.
    slot_blocks: torch.Tensor | None = None
    slot_offsets: torch.Tensor | None = None

    def split_slots(self) -> None:
        self.slot_blocks = torch.div(self.slot_mapping, self.block_size, rounding_mode="floor")
        self.slot_offsets = self.slot_mapping % self.block_size

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.query_lens_cpu)
