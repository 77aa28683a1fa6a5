"""The Gemma 4 decoder layer.

  h   = x + post_attention_layernorm(attention(input_layernorm(x)))
  m   = mlp(pre_mlp_layernorm(h))                                   dense GELU-tanh gated MLP
  MoE layers:  m = post_mlp_layernorm(m) + post_moe_layernorm(experts(pre_moe_layernorm(h), router(h)))
  out = (h + post_ffn_layernorm(m)) * layer_scalar                  layer_scalar: a loaded buffer

On CUDA the elementwise work between the matmuls runs as few compiled regions (fewer launches, less host time per
layer): q/k/v norms with both RoPEs, the attention residual with every norm that reads it, and the feed-forward tail.
The norm modules keep their parameters and names; the regions read their weights.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch.utils.checkpoint import checkpoint

from gemma4_support.attention.backends import AttentionBackend
from gemma4_support.config.spec import LayerSpec
from gemma4_support.fused import cuda_compiled
from gemma4_support.model.attention import Gemma4Attention
from gemma4_support.model.mlp import Gemma4MoE, dense_mlp
from gemma4_support.model.norm import Gemma4RMSNorm, rms_norm_inline
from gemma4_support.model.router import scaled_router_input


@cuda_compiled
def attention_residual(residual: torch.Tensor, attn: torch.Tensor, eps: float, post_attention: torch.Tensor,
                       pre_mlp: torch.Tensor, pre_moe: torch.Tensor | None = None, router_scale: torch.Tensor | None = None,
                       router_root: float = 1.0) -> tuple[torch.Tensor, ...]:
    """residual + post_attention_layernorm(attn) = h, and what reads h: (h, pre_mlp_layernorm(h)) on dense layers,
    (h, pre_mlp_layernorm(h), pre_moe_layernorm(h), the router's scaled input) on MoE layers; one region on CUDA."""
    hidden = residual + rms_norm_inline(attn, post_attention, eps)
    mlp_input = rms_norm_inline(hidden, pre_mlp, eps)
    if pre_moe is None:
        return hidden, mlp_input
    router_input = scaled_router_input(rms_norm_inline(hidden, None, eps), router_scale, router_root)
    return hidden, mlp_input, rms_norm_inline(hidden, pre_moe, eps), router_input


@cuda_compiled
def ffn_residual(residual: torch.Tensor, ffn: torch.Tensor, eps: float, post_ffn: torch.Tensor, layer_scalar: torch.Tensor,
                 post_mlp: torch.Tensor | None = None, routed: torch.Tensor | None = None,
                 post_moe: torch.Tensor | None = None) -> torch.Tensor:
    """(residual + post_ffn_layernorm(ffn)) x layer_scalar, where on MoE layers ffn = post_mlp_layernorm(dense) +
    post_moe_layernorm(routed); one region on CUDA."""
    if routed is not None:
        ffn = rms_norm_inline(ffn, post_mlp, eps) + rms_norm_inline(routed, post_moe, eps)
    return (residual + rms_norm_inline(ffn, post_ffn, eps)) * layer_scalar


class Gemma4DecoderLayer(MegatronModule):
    """One decoder layer; `config` is the layer's own config (head dim, kv heads)."""

    def __init__(self, config: TransformerConfig, layer: LayerSpec, backend: AttentionBackend, tp_size: int = 1) -> None:
        super().__init__(config=config)
        self.layer = layer
        self.window = layer.window  # the key of this layer's prepared mask (None = global)
        eps, dtype, hidden = config.layernorm_epsilon, config.params_dtype, config.hidden_size

        def norm() -> Gemma4RMSNorm:
            return Gemma4RMSNorm(hidden, eps, dtype=dtype)

        self.input_layernorm = norm()
        self.self_attention = Gemma4Attention(config, layer, backend, tp_size=tp_size)
        self.post_attention_layernorm = norm()
        self.pre_mlp_layernorm = norm()
        self.mlp = dense_mlp(config)
        self.is_moe = layer.mlp == "moe"
        if self.is_moe:
            self.post_mlp_layernorm = norm()
            self.pre_moe_layernorm = norm()
            self.moe = Gemma4MoE(config)
            self.post_moe_layernorm = norm()
        self.post_ffn_layernorm = norm()
        self.register_buffer("layer_scalar", torch.ones(1, dtype=dtype))

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: object) -> torch.Tensor:
        """hidden [s, b, h] -> [s, b, h]."""
        residual = hidden
        attn = self.self_attention(self.input_layernorm(hidden), rotary, mask)
        eps = self.input_layernorm.eps
        if not self.is_moe:
            hidden, mlp_input = attention_residual(residual, attn, eps, self.post_attention_layernorm.scale(),
                                                   self.pre_mlp_layernorm.scale())
            ffn, _ = self.mlp(mlp_input)
            return ffn_residual(hidden, ffn, eps, self.post_ffn_layernorm.scale(), self.layer_scalar)
        router = self.moe.router
        hidden, mlp_input, expert_input, router_input = attention_residual(
            residual, attn, eps, self.post_attention_layernorm.scale(), self.pre_mlp_layernorm.scale(),
            self.pre_moe_layernorm.scale(), router.scale, router.root_size)
        ffn, _ = self.mlp(mlp_input)
        routed = self.moe(hidden, expert_input, router_input)
        return ffn_residual(hidden, ffn, eps, self.post_ffn_layernorm.scale(), self.layer_scalar,
                            self.post_mlp_layernorm.scale(), routed, self.post_moe_layernorm.scale())

    def recomputed(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: object) -> torch.Tensor:
        """forward, its activations recomputed in backward under the router replay in force now (the backward runs
        after a `replay_routing` block has closed: a recompute routing freely would not be the forward it replaces)."""
        replay = self.moe.router.replay if self.is_moe else None

        def run(*args: object) -> torch.Tensor:
            with self.moe.router.replaying(replay) if self.is_moe else nullcontext():
                return self(*args)

        return checkpoint(run, hidden, rotary, mask, use_reentrant=False)
