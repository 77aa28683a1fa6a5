"""The Gemma 4 router: scale-free RMSNorm of the residual, x learned `scale` x hidden^-0.5, linear to E
logits, softmax over all experts in fp32, top-k, renormalise the k weights to sum 1, x per_expert_scale[idx].
No auxiliary loss."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from gemma4_support.model.norm import Gemma4RMSNorm


def route(logits: torch.Tensor, top_k: int, per_expert_scale: torch.Tensor,
          replay: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] fp32, expert indices [T, k]); `replay` [T, k] imposes the experts
    (a row of -1: no recorded choice for that token, which routes freely)."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, indices = torch.topk(probs, k=top_k, dim=-1)
    if replay is not None:
        indices = torch.where(replay >= 0, replay, indices)
        weights = probs.gather(-1, indices)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * per_expert_scale[indices]
    return weights, indices


def scaled_router_input(normed: torch.Tensor, scale: torch.Tensor, root_size: float) -> torch.Tensor:
    """The scale-free normed residual x the learned scale x hidden^-0.5 (in the model's dtype, as HF rounds it)."""
    return normed * scale * root_size


class Gemma4Router(MegatronModule):
    """Routes tokens of the residual stream to experts (weights replicated across tensor parallel ranks)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config=config)
        hidden, experts = config.hidden_size, config.num_moe_experts
        self.top_k = config.moe_router_topk
        self.root_size = hidden ** -0.5
        self.norm = Gemma4RMSNorm(hidden, config.layernorm_epsilon, with_scale=False)
        self.weight = torch.nn.Parameter(torch.empty(experts, hidden, dtype=config.params_dtype))
        self.scale = torch.nn.Parameter(torch.ones(hidden, dtype=config.params_dtype))
        self.per_expert_scale = torch.nn.Parameter(torch.ones(experts, dtype=config.params_dtype))
        self.replay: torch.Tensor | None = None  # [T, k] expert indices to impose (router replay), else None
        self.last_choice: torch.Tensor | None = None  # the router's own top-k of the last call (diagnostics)

    @contextmanager
    def replaying(self, replay: torch.Tensor | None) -> Iterator[None]:
        """Within the block, `replay` is imposed (None: the router chooses); the previous setting comes back after."""
        previous, self.replay = self.replay, replay
        try:
            yield
        finally:
            self.replay = previous

    def scaled_input(self, residual: torch.Tensor) -> torch.Tensor:
        """What the router's linear reads: norm(residual) x scale x hidden^-0.5."""
        return scaled_router_input(self.norm(residual), self.scale, self.root_size)

    def forward(self, residual: torch.Tensor, scaled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """residual [T, h] -> (weights [T, k], indices [T, k]); with `replay` set, its experts are used. `scaled`:
        `scaled_input(residual)` when a fused region has computed it already."""
        x = self.scaled_input(residual) if scaled is None else scaled
        logits = F.linear(x, self.weight)
        weights, indices = route(logits, self.top_k, self.per_expert_scale)
        self.last_choice = indices.detach()
        if self.replay is None:
            return weights, indices
        return route(logits, self.top_k, self.per_expert_scale, self.replay)
