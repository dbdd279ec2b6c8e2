"""FlashInfer's fused elementwise kernels, used on CUDA in place of chains of torch ops.

In a decode step of an 8B model the matrix products are a few large kernels, while the
norms, RoPE and SwiGLU written in plain torch are ~40 small kernels per layer; inside a
CUDA graph each still costs a few microseconds, about as much time as the weights take
to stream. One kernel each (fused residual-add + RMSNorm, in-place RoPE from a cos/sin
table, SwiGLU) removes most of that. Each computes in float32 and rounds once, as HF's
float32 norms and RoPE do; the SwiGLU product rounds once where HF rounds twice.

`enable(model)` switches a built model's layers over; the torch code stays the CPU path
and the oracle. Where Triton runs, attention layers also take Baton's fused RoPE + paged
KV write (kernels/attention/rope_kv_write.py) in place of FlashInfer's RoPE and two
`index_put`s.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kernels.attention.rope_kv_write import triton_unavailable_reason

log = logging.getLogger(__name__)


def enable(model: nn.Module) -> int:
    """Turns on the fused path of every layer that has one; returns how many."""
    n = 0
    for module in model.modules():
        if hasattr(module, "use_fused_kernels"):
            module.use_fused_kernels = True
            n += 1
    log.info("fused FlashInfer kernels enabled in %d modules", n)
    return n


def set_rope_kv_write(model: nn.Module, on: bool) -> bool:
    """Switches the fused RoPE + KV-write kernel on or off (benchmarks compare both in one
    process); returns whether it is on. Off, with a log line, where Triton is missing."""
    return switch_modules(model, "fuse_rope_kv_write", on, triton_unavailable_reason(),
                          "fused RoPE + KV write")


def switch_modules(model: nn.Module, attr: str, on: bool, off_reason: str | None,
                   what: str) -> bool:
    """Sets `attr` on every module that has it; a switch asked on stays off, with a log
    line naming `off_reason`, when there is one. Returns whether it is on."""
    if on and off_reason is not None:
        log.warning("%s off: %s", what, off_reason)
        on = False
    for module in model.modules():
        if hasattr(module, attr):
            setattr(module, attr, on)
    return on


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from flashinfer.norm import rmsnorm as fi_rmsnorm

    return fi_rmsnorm(x, weight, eps)


def add_rmsnorm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; x = rmsnorm(residual): both in place, one kernel."""
    from flashinfer.norm import fused_add_rmsnorm

    fused_add_rmsnorm(x, residual, weight, eps)
    return x, residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    from flashinfer.activation import silu_and_mul as fi_silu_and_mul

    return fi_silu_and_mul(x)


def rope_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_dim: int,
          cos_sin: torch.Tensor) -> None:
    """Rotates q [T, Hq*D] and k [T, Hk*D] in place (neox style, like HF Llama)."""
    from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace

    apply_rope_with_cos_sin_cache_inplace(positions, q, k, head_dim, cos_sin, is_neox=True)
