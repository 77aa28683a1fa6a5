"""The one token loss: cross entropy of labels under a loss mask, in fp32."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
               denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """Sum of cross entropy over masked positions divided by `denominator` (default: the masked count).

    logits [..., vocab], labels and loss_mask [...]; no mask = every position. A context-parallel rank passes
    the whole row's count as `denominator`, so the ranks' losses sum to the row's mean.
    """
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    if loss_mask is None:
        return flat.sum() / (flat.numel() if denominator is None else denominator)
    mask = loss_mask.reshape(-1)
    return flat[mask].sum() / (mask.sum() if denominator is None else denominator)
