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


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages normalised within each group (GRPO): (reward - group mean) / (group std + eps);
    a group whose rewards are all equal gets zeros."""
    rewards = rewards.double()
    out = torch.zeros_like(rewards)
    for g in groups.unique():
        sel = groups == g
        r = rewards[sel]
        std = r.std(unbiased=False) if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
        out[sel] = (r - r.mean()) / (std + eps) if std > 0 else torch.zeros_like(r)
    return out


def policy_loss(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, kind: str = "grpo", clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-mean policy-gradient loss over masked positions, with the importance ratio
    r = exp(logprobs - sampler_logprobs) against the sampler (vLLM); returns (loss, r at the masked positions).

    kind "grpo": -min(r·A, clip(r, 1 ± clip)·A) (PPO/GRPO clipping); "cispo": -sg(min(r, 1 + clip))·A·logprobs
    (CISPO: the clipped ratio weights the log-prob gradient and is never differentiated)."""
    mask = mask.bool()
    lp, old, adv = logprobs[mask], sampler_logprobs[mask].to(logprobs.dtype), advantages[mask].to(logprobs.dtype)
    ratio = torch.exp(lp - old)
    if kind == "grpo":
        per = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    elif kind == "cispo":
        per = -(ratio.clamp(max=1 + clip).detach() * adv * lp)
    else:
        raise ValueError(f"policy loss kind {kind!r} is not 'grpo' or 'cispo'")
    return per.sum() / max(int(mask.sum()), 1), ratio.detach()
