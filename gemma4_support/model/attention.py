"""Gemma 4 self-attention from megatron-core parallel linears.

Per layer: its own head dim and kv heads; q/k norms (learned, per head) and a scale-free v norm; RoPE from
the layer type's table; on full layers with K=V there is no v projection and V is the raw k projection
(before k_norm and before RoPE). The fused `linear_qkv` uses Megatron's grouped layout: for each kv group,
its query heads, then its key head, then (unless K=V) its value head.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from gemma4_support.attention.backends import AttentionBackend
from gemma4_support.config.spec import LayerSpec
from gemma4_support.errors import ConfigError
from gemma4_support.fused import cuda_compiled
from gemma4_support.model import rope
from gemma4_support.model.norm import Gemma4RMSNorm, rms_norm_inline


@cuda_compiled
def normed_rotary_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_weight: torch.Tensor,
                      k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw q, k, v [s, b, n, d] -> (RoPE(q_norm(q)), RoPE(k_norm(k)), scale-free norm(v)): one compiled region on CUDA."""
    rotate = getattr(rope.apply_rotary, "eager", rope.apply_rotary)  # a patched apply_rotary (sensitivity tests) is used as is
    query = rotate(rms_norm_inline(query, q_weight, eps), cos, sin)
    key_out = rotate(rms_norm_inline(key, k_weight, eps), cos, sin)
    return query, key_out, rms_norm_inline(value, None, eps)


class Gemma4Attention(MegatronModule):
    """Self-attention of one Gemma 4 layer (config = that layer's config from `layer_config`); the model's
    attention backend attends."""

    def __init__(self, config: TransformerConfig, layer: LayerSpec, backend: AttentionBackend, tp_size: int = 1) -> None:
        super().__init__(config=config)
        self.layer = layer
        self.head_dim = layer.head_dim
        self.k_eq_v = layer.k_eq_v
        heads, groups = config.num_attention_heads, layer.num_kv_heads
        if groups % tp_size:
            raise ConfigError(f"layer {layer.index}: {groups} kv heads cannot be split over tensor parallel size {tp_size}",
                              "choose a tensor parallel size that divides every layer's kv heads")
        self.heads_per_group = heads // groups
        self.local_groups = groups // tp_size
        self.slots_per_group = self.heads_per_group + (1 if layer.k_eq_v else 2)  # q heads, k, [v]
        self.backend = backend
        tp_group = parallel_state.get_tensor_model_parallel_group()
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size, groups * self.slots_per_group * self.head_dim, config=config,
            init_method=config.init_method, bias=False, gather_output=False, tp_group=tp_group,
        )
        self.q_layernorm = Gemma4RMSNorm(self.head_dim, config.layernorm_epsilon, dtype=config.params_dtype)
        self.k_layernorm = Gemma4RMSNorm(self.head_dim, config.layernorm_epsilon, dtype=config.params_dtype)
        if tp_size > 1:  # each rank normalises only its own heads: the per-head norms' gradients are partial sums
            self.q_layernorm.tp_group = self.k_layernorm.tp_group = tp_group
        self.linear_proj = RowParallelLinear(
            heads * self.head_dim, config.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=True, tp_group=tp_group,
        )

    def split_qkv(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[s, b, groups*slots*d] -> raw q [s, b, q_heads, d], k and v [s, b, kv_heads, d]; V = raw K on K=V layers."""
        s, b = mixed.shape[:2]
        grouped = mixed.view(s, b, self.local_groups, self.slots_per_group, self.head_dim)
        query = grouped[:, :, :, : self.heads_per_group].reshape(s, b, -1, self.head_dim)
        key = grouped[:, :, :, self.heads_per_group]
        value = key if self.k_eq_v else grouped[:, :, :, self.heads_per_group + 1]
        return query, key, value

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: object) -> torch.Tensor:
        """hidden [s, b, h] -> attention output [s, b, h]."""
        cos, sin = rotary
        mixed, _ = self.linear_qkv(hidden)
        query, key, value = self.split_qkv(mixed)
        query, key, value = normed_rotary_qkv(query, key, value, self.q_layernorm.scale(), self.k_layernorm.scale(),
                                              cos, sin, self.q_layernorm.eps)
        # [s, b, n, d] -> [b, n, s, d] for the attend step, and back.
        out = self.backend.attend(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3), mask)
        out = out.permute(2, 0, 1, 3).reshape(hidden.shape[0], hidden.shape[1], -1)
        out, _ = self.linear_proj(out)
        return out
