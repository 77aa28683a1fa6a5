"""Eager attention, the reference kernel: (q, k, v after norms and RoPE, boolean mask) -> output.

The dense backend attends with it (`gemma4_support.attention.backends`). The contract every backend's
attend step keeps:

  attend(query [b, q_heads, s_q, d], key [b, kv_heads, s_k, d], value [b, kv_heads, s_k, d], mask) -> [b, q_heads, s_q, d]

with `mask` what the backend prepared for the layer's window (here a boolean [b, s_q, s_k] tensor, True =
may attend). Gemma 4 semantics: scale 1.0, no logit softcap, softmax in fp32,
grouped-query attention (kv head h serves query heads h*g .. h*g+g-1).
"""
from __future__ import annotations

import torch


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eager scaled-dot-product attention with scale 1.0 and a boolean allow-mask."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2))  # scale 1.0
    scores = scores.masked_fill(~mask.unsqueeze(1), torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value)
