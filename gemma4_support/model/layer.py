"""The Gemma 4 decoder layer.

  h   = x + post_attention_layernorm(attention(input_layernorm(x)))
  m   = mlp(pre_mlp_layernorm(h))                                   dense GELU-tanh gated MLP
  MoE layers:  m = post_mlp_layernorm(m) + post_moe_layernorm(experts(pre_moe_layernorm(h), router(h)))
  out = (h + post_ffn_layernorm(m)) * layer_scalar                  layer_scalar: a loaded buffer
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch.utils.checkpoint import checkpoint

from gemma4_support.attention.backends import AttentionBackend
from gemma4_support.config.spec import LayerSpec
from gemma4_support.model.attention import Gemma4Attention
from gemma4_support.model.mlp import Gemma4MoE, dense_mlp
from gemma4_support.model.norm import Gemma4RMSNorm


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
        hidden = residual + self.post_attention_layernorm(attn)

        residual = hidden
        ffn, _ = self.mlp(self.pre_mlp_layernorm(hidden))
        if self.is_moe:
            routed = self.moe(residual, self.pre_moe_layernorm(residual))
            ffn = self.post_mlp_layernorm(ffn) + self.post_moe_layernorm(routed)
        hidden = residual + self.post_ffn_layernorm(ffn)
        return hidden * self.layer_scalar

    def recomputed(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: object) -> torch.Tensor:
        """forward, its activations recomputed in backward under the router replay in force now (the backward runs
        after a `replay_routing` block has closed: a recompute routing freely would not be the forward it replaces)."""
        replay = self.moe.router.replay if self.is_moe else None

        def run(*args: object) -> torch.Tensor:
            with self.moe.router.replaying(replay) if self.is_moe else nullcontext():
                return self(*args)

        return checkpoint(run, hidden, rotary, mask, use_reentrant=False)
