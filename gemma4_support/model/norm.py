"""Gemma 4 RMSNorm: computed in fp32, multiplied by `weight` (init 1, not 1 + weight); optionally scale-free."""
from __future__ import annotations

import torch
from torch import nn


class Gemma4RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) [* weight], in fp32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, *, with_scale: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        x = hidden.float()
        out = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.with_scale:
            out = out * self.weight.float()
        return out.type_as(hidden)
