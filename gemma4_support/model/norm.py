"""Gemma 4 RMSNorm: computed in fp32, multiplied by `weight` (init 1, not 1 + weight); optionally scale-free."""
from __future__ import annotations

import torch
from torch import nn

from gemma4_support.fused import cuda_compiled


@cuda_compiled
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) [* weight] over the last dimension, in fp32, cast back to x's dtype."""
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


class Gemma4RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) [* weight], in fp32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, *, with_scale: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.with_scale = with_scale
        # Set when the norm runs on a tensor-parallel shard of its input (per-head norms of a rank's heads): the
        # replicated weight's gradient is then summed over this group, so every rank holds the full gradient.
        self.tp_group: object | None = None
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def scale(self) -> torch.Tensor | None:
        """The weight this norm multiplies by (None when scale-free), as a fused region that inlines the norm takes it."""
        if not self.with_scale:
            return None
        if self.tp_group is None:
            return self.weight
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(self.weight, self.tp_group)  # identity; gradient all-reduced

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        flat = hidden.reshape(-1, hidden.shape[-1])  # one compiled graph per width, whatever the leading dims
        return rms_norm(flat, self.scale(), self.eps).view(hidden.shape)


def rms_norm_inline(hidden: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`rms_norm`'s own arithmetic over the last dimension, uncompiled: for the body of a larger fused region."""
    return rms_norm.eager(hidden.reshape(-1, hidden.shape[-1]), weight, eps).view(hidden.shape)
