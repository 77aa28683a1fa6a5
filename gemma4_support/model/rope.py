"""Gemma 4 rotary embeddings: a (local, global) pair of cos/sin tables gathered by position ids.

Sliding layers: default RoPE over the whole head (theta 1e4). Full layers: "proportional" RoPE (theta 1e6,
factor 0.25): head_dim/2 frequencies, the first int(0.25 * head_dim / 2) equal to theta^(-2k/head_dim)
(denominator = the FULL head dim), the rest zero (identity rotation), all divided by the RoPE `factor` (default
1). In both, lane d pairs with d + head_dim/2 across the whole head (neox rotate-half). This is not Megatron's `rotary_percent`, which
rotates only the first lanes with its own denominator and pairing.
"""
from __future__ import annotations

import torch
from torch import nn

from gemma4_support.config.spec import FULL, SLIDING, ModelSpec, RopeSpec
from gemma4_support.fused import cuda_compiled


def inverse_frequencies(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """fp32 [head_dim/2] inverse frequencies of one layer type."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "proportional":
        rotating = int(rope.partial_rotary_factor * head_dim // 2)
        inv_freq[rotating:] = 0.0
        inv_freq = inv_freq / rope.factor  # transformers divides every frequency by the RoPE scaling factor
    return inv_freq


def rotary_tables(inv_freq: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [s, b, 1, head_dim] (fp32) for position ids [b, s]: angle = float(position) * inv_freq, HF's fp32
    product (no host synchronisation: nothing depends on the positions' values)."""
    angles = position_ids.t().to(torch.float32)[..., None] * inv_freq.to(position_ids.device)  # [s, b, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # lane d and d + head_dim/2 share a frequency
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@cuda_compiled
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [s, b, heads, d] by the tables (cast to x's dtype first, as HF does)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class RotaryPair(nn.Module):
    """The (local, global) rotary pair: per layer type, cos/sin for the given position ids."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.layer_types: list[str] = []
        for layer_type in (SLIDING, FULL):
            layer = next((l for l in spec.layers if l.layer_type == layer_type), None)
            if layer is None:
                continue
            self.layer_types.append(layer_type)
            self.register_buffer(f"{layer_type}_inv_freq", inverse_frequencies(layer.rope, layer.head_dim), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer_type: (cos, sin)} for position ids [b, s]."""
        out = {}
        for layer_type in self.layer_types:
            inv_freq = getattr(self, f"{layer_type}_inv_freq").float()
            out[layer_type] = rotary_tables(inv_freq, position_ids)
        return out
