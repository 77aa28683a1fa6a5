"""ModelSpec -> megatron-core TransformerConfig: one model-wide config plus a per-layer copy
carrying that layer's head dim and kv heads (Gemma 4's geometry differs per layer)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from gemma4_support.config.spec import LayerSpec, ModelSpec
from gemma4_support.errors import ConfigError

# HF's "gelu_pytorch_tanh" is torch's tanh-approximated GELU.
_ACTIVATIONS = {"gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


def activation_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function for an HF `hidden_activation` name."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"hidden_activation {name!r} is not supported", f"use one of {sorted(_ACTIVATIONS)}") from None


def transformer_config(spec: ModelSpec, *, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """The model-wide megatron-core config (geometry of the first layer; layers override it)."""
    first = spec.layers[0]
    moe = spec.moe
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=first.num_kv_heads,
        kv_channels=first.head_dim,
        ffn_hidden_size=spec.intermediate_size,
        gated_linear_unit=True,  # [gate; up] in linear_fc1, gate first
        activation_func=activation_function(spec.hidden_activation),
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        qk_layernorm=True,
        softmax_scale=1.0,  # Gemma 4: no 1/sqrt(d)
        hidden_dropout=0.0,
        attention_dropout=0.0,
        num_moe_experts=moe.num_experts if moe else None,
        moe_router_topk=moe.top_k if moe else 2,
        moe_ffn_hidden_size=moe.expert_intermediate_size if moe else None,
        moe_aux_loss_coeff=0.0,  # Gemma 4 has no auxiliary loss
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,  # built on the host, then moved (build.build_model)
        perform_initialization=False,  # weights always come from a checkpoint
        cuda_graph_scope=[],  # the default "full" only emits a deprecation warning
    )


def layer_config(config: TransformerConfig, layer: LayerSpec) -> TransformerConfig:
    """A copy of `config` with one layer's head dim and kv heads (its window lives in the attention masks)."""
    return dataclasses.replace(config, kv_channels=layer.head_dim, num_query_groups=layer.num_kv_heads)
