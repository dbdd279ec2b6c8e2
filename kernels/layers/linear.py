"""Tensor-parallel linear layers. Each allocates only its own shard and fills it
through `weight_loader(param, full_weight, shard_id)`, which slices the checkpoint
tensor for this rank (so no rank ever materialises another rank's part)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.parallel import ParallelContext


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(src.shape)}, "
                         f"model expects {tuple(dst.shape)}")
    dst.copy_(src)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool,
                 pc: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.pc = pc
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        raise NotImplementedError


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool,
                 pc: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__(in_features, out_features, bias, pc, dtype)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        _copy_checked(param.data, loaded, "replicated linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Splits the output dim; each rank computes a slice of the outputs, no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 pc: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__(in_features, pc.shard(out_features, "output features"), bias, pc, dtype)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        n = param.shape[0]
        _copy_checked(param.data, loaded.narrow(0, self.pc.tp_rank * n, n), "column linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one GEMM (gate_proj + up_proj).
    `shard_id` is the index of the sub-projection being loaded."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool,
                 pc: ParallelContext, dtype: torch.dtype) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, pc, dtype)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        tp = self.pc.tp_size
        offset = sum(self.out_sizes[: int(shard_id)]) // tp
        size = self.out_sizes[int(shard_id)] // tp
        src = loaded.narrow(0, self.pc.tp_rank * size, size)
        _copy_checked(param.data.narrow(0, offset, size), src, f"merged linear part {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; KV heads are split across ranks (replicated when
    there are fewer KV heads than ranks is not supported yet)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool, pc: ParallelContext, dtype: torch.dtype) -> None:
        self.head_dim = head_dim
        self.num_heads = pc.shard(num_heads, "num_attention_heads")
        self.num_kv_heads = pc.shard(num_kv_heads, "num_key_value_heads")
        out = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden_size, out, bias, pc, dtype)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        src = loaded.narrow(0, self.pc.tp_rank * size, size)
        _copy_checked(param.data.narrow(0, offset, size), src, f"qkv part {shard_id}")


class RowParallelLinear(LinearBase):
    """Splits the input dim; partial sums are all-reduced (the one collective per block)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 pc: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__(pc.shard(in_features, "input features"), out_features, bias, pc, dtype)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if param.dim() == 1:  # bias: added once, on rank 0 only, after the reduce
            _copy_checked(param.data, loaded, "row linear bias")
            return
        n = param.shape[1]
        _copy_checked(param.data, loaded.narrow(1, self.pc.tp_rank * n, n), "row linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.pc.tp_rank == 0 else None
        return self.pc.all_reduce(F.linear(x, self.weight, bias))
