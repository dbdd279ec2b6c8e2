"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.parallel import ParallelContext


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, pc: ParallelContext,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.pc = pc
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // pc.tp_size)  # last rank may hold padding rows
        self.start = pc.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[1] != param.shape[1] or loaded.shape[0] != self.vocab_size:
            raise ValueError(f"shape mismatch for embedding: checkpoint {tuple(loaded.shape)}, "
                             f"model expects ({self.vocab_size}, {param.shape[1]})")
        n = min(self.shard_size, self.vocab_size - self.start)
        param.data[:n].copy_(loaded[self.start : self.start + n])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.pc.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        mask = (local >= 0) & (local < self.shard_size)
        out = F.embedding(local.clamp(0, self.shard_size - 1), self.weight)
        out = out * mask.unsqueeze(-1).to(out.dtype)
        return self.pc.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocab slice, gathered to full vocab on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        logits = self.pc.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
