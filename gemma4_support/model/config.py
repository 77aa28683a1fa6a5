"""ModelSpec -> megatron-core TransformerConfig: one model-wide config plus a per-layer copy
carrying that layer's head dim and kv heads (Gemma 4's geometry differs per layer).

megatron-core validates its config in `__post_init__` and raises its own ValueError / AssertionError, worded in
its own option names; both builders here turn that into one ConfigError line naming the HF config field(s)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from gemma4_support.config.spec import LayerSpec, ModelSpec
from gemma4_support.errors import ConfigError

# transformers' ACT2FN functions, exactly: "gelu_pytorch_tanh" is torch's tanh-approximated GELU, "gelu" the
# erf GELU, "silu"/"swish" SiLU (config/scope.ACTIVATIONS lists the accepted names).
_ACTIVATIONS = {"gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"), "gelu": F.gelu, "silu": F.silu,
                "swish": F.silu, "relu": F.relu}
# megatron-core option (as its messages spell it) -> the HF Gemma4TextConfig field it is built from.
_HF_FIELD_OF = {
    "num_moe_experts": "num_experts", "moe_router_topk": "top_k_experts", "topk": "top_k_experts",
    "moe_ffn_hidden_size": "moe_intermediate_size", "num_query_groups": "num_key_value_heads",
    "kv_channels": "head_dim", "num_attention_heads": "num_attention_heads", "ffn_hidden_size": "intermediate_size",
    "hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "layernorm_epsilon": "rms_norm_eps",
}


def activation_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function for an HF `hidden_activation` name."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"hidden_activation {name!r} is not supported", f"use one of {sorted(_ACTIVATIONS)}") from None


def megatron_refusal(exc: Exception, where: str) -> ConfigError:
    """megatron-core's validation error as one ConfigError line naming the HF field(s) it came from."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    lowered = message.lower()
    fields = sorted({hf for mc, hf in _HF_FIELD_OF.items() if mc in lowered or mc.replace("_", "-") in lowered})
    named = ", ".join(fields) if fields else "the model geometry"
    return ConfigError(f"megatron-core rejects the {where} built from {named}: {message[:300]}",
                       f"this Gemma 4 variant is not modelled: change {named} in config.json")


def transformer_config(spec: ModelSpec, *, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """The model-wide megatron-core config (geometry of the first layer; layers override it)."""
    try:
        return _transformer_config(spec, params_dtype)
    except (ValueError, AssertionError, TypeError) as exc:
        raise megatron_refusal(exc, "model config") from None


def _transformer_config(spec: ModelSpec, params_dtype: torch.dtype) -> TransformerConfig:
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
        # Gemma 4's router (model/router.py, not megatron's) takes the softmax over all experts BEFORE top-k:
        # megatron calls that pre-softmax and, with top_k_experts = 1, refuses a config that does not say so.
        moe_router_pre_softmax=True,
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
    try:
        return dataclasses.replace(config, kv_channels=layer.head_dim, num_query_groups=layer.num_kv_heads)
    except (ValueError, AssertionError, TypeError) as exc:
        raise megatron_refusal(exc, f"layer {layer.index} config") from None
