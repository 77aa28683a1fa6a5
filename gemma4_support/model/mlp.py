"""Gemma 4 feed-forward blocks from megatron-core: the dense GELU-tanh gated MLP (megatron `MLP`, linear_fc1 =
[gate; up]) and the routed experts (megatron `SequentialMLP`, one `MLP` per expert), with a plain
sort-by-expert dispatch that works on one device."""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP

from gemma4_support.model.router import Gemma4Router

_LINEARS = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def dense_mlp(config: TransformerConfig) -> MLP:
    """The dense gated MLP of width `config.ffn_hidden_size` (Gemma 4's "shared expert" on MoE layers)."""
    return MLP(config, _LINEARS, ffn_hidden_size=config.ffn_hidden_size,
               tp_group=parallel_state.get_tensor_model_parallel_group())


class Gemma4Experts(SequentialMLP):
    """Routed experts (megatron SequentialMLP: `local_experts.{e}.linear_fc1/linear_fc2`):
    out = sum over the chosen experts of weight * down_e(gelu_tanh(gate_e(x)) * up_e(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        pg = ProcessGroupCollection.use_mpu_process_groups()
        super().__init__(config.num_moe_experts, config, _LINEARS, pg_collection=pg)
        self.num_experts = config.num_moe_experts

    def routed(self, hidden: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """hidden [T, h], routing weights/indices [T, k] -> [T, h] (sort tokens by expert, run, scatter back)."""
        top_k = indices.shape[-1]
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // top_k
        tokens_per_expert = torch.bincount(flat, minlength=self.num_experts)
        # The routing weight multiplies each expert's output (as HF does), not its intermediate activation
        # (SequentialMLP's per-token scale): pass ones, so megatron's multiply is exact, and scale after fc2.
        weights = weights.reshape(-1)[order]
        out, _ = self(hidden[token_of], tokens_per_expert, torch.ones_like(weights))
        out = (out * weights[:, None]).to(hidden.dtype)
        # Add the experts' outputs one expert at a time, in expert order, as HF does: within one expert every token id
        # is unique, so each add rounds once per token in a fixed order (one index_add_ over repeated token ids would
        # round in another order in bf16, and on CUDA in no fixed order at all: atomics).
        combined = torch.zeros_like(hidden)
        counts = tokens_per_expert.tolist()
        for tokens, chunk in zip(token_of.split(counts), out.split(counts)):
            if len(tokens):
                combined.index_add_(0, tokens, chunk)
        return combined


class Gemma4MoE(MegatronModule):
    """The routed half of a Gemma 4 MoE layer: router (on the residual) + experts (on their own normed input)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config=config)
        self.router = Gemma4Router(config)
        self.experts = Gemma4Experts(config)

    def forward(self, residual: torch.Tensor, expert_input: torch.Tensor) -> torch.Tensor:
        """residual and normed expert input [s, b, h] -> experts' output [s, b, h]."""
        hidden = residual.shape[-1]
        weights, indices = self.router(residual.reshape(-1, hidden))
        out = self.experts.routed(expert_input.reshape(-1, hidden), weights, indices)
        return out.reshape(residual.shape)
