"""RMSNorm, computed in float32 like Hugging Face so bf16 results agree."""

from __future__ import annotations

import torch
from torch import nn

from kernels.layers import fused


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.use_fused_kernels = False  # kernels.layers.fused.enable() turns it on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused_kernels and x.dim() == 2 and x.is_contiguous():
            return fused.rmsnorm(x, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward_with_residual(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the residual stream first, returns (normed, new residual): the pattern every
        pre-norm decoder layer uses, in one place so a fused kernel can replace it."""
        if residual is not None and self.use_fused_kernels and x.is_contiguous():
            return fused.add_rmsnorm_(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        return self.forward(x), x
