"""What of a Gemma 4 text config this library models, and the one-line refusal of everything else.

Every `Gemma4TextConfig` field that changes the text model's math (transformers 5.19, `modeling_gemma4.py`) is
either read into the spec (`spec.py`) or refused here, naming the field and the fix. Fields with no effect on
a causal text-only forward/backward are accepted as they are: `use_bidirectional_attention: "vision"` (only
vision tokens of the multimodal wrapper), `use_double_wide_mlp` without KV sharing (transformers widens only
KV-shared layers), `vocab_size_per_layer_input` without per-layer embeddings, `max_position_embeddings`,
`initializer_range`, `use_cache` and the token ids other than `pad_token_id`.
"""
from __future__ import annotations

from typing import Any

from gemma4_support.config.hf_fields import TEXT_MODEL_TYPE, WRAPPER_MODEL_TYPE
from gemma4_support.errors import ConfigError, UnsupportedVariantError, short_repr

_DEFAULT_PLE_WIDTH = 256  # hidden_size_per_layer_input's HF default: per-layer embeddings ON
# transformers' ACT2FN names whose function this library reproduces exactly (model/config.py maps them).
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu", "swish", "relu")
# The only attributes Gemma 4's modeling code reads per layer (Gemma4TextAttention: per_layer_config[i]); any
# other per-layer override makes transformers refuse the global read, or is never read at all.
PER_LAYER_FIELDS = ("head_dim", "num_key_value_heads")


# The other Gemma 4 model types transformers 5.19 registers: refused by name, saying what they are.
SIBLING_MODEL_TYPES = {
    "gemma4_unified": "the unified multimodal model (Gemma 4 12B)",
    "gemma4_unified_text": "the unified model's text decoder (Gemma 4 12B)",
    "gemma4_assistant": "a speculative-decoding drafter that reads the main model's KV states",
    "gemma4_unified_assistant": "the unified model's speculative-decoding drafter",
    "gemma4_vision": "a vision tower config", "gemma4_unified_vision": "a vision tower config",
    "gemma4_audio": "an audio tower config", "gemma4_unified_audio": "an audio tower config",
}


def model_type_error(model_type: object) -> ConfigError:
    """The refusal of a config whose model_type is neither gemma4_text nor the gemma4 wrapper."""
    fix = (f"point it at the config.json of a 26B-A4B or 31B checkpoint (model_type {TEXT_MODEL_TYPE!r} or "
           f"{WRAPPER_MODEL_TYPE!r})")
    shown = short_repr(model_type)
    if isinstance(model_type, str) and model_type.startswith("gemma4"):
        what = SIBLING_MODEL_TYPES.get(model_type, "a Gemma 4 model type this suite does not know")
        return UnsupportedVariantError(f"model_type {shown} is {what}: this suite models the Gemma 4 text decoder of "
                                       "26B-A4B and 31B only", fix)
    return ConfigError(f"unknown model_type {shown}: this suite reads Gemma 4 only", fix)


def refuse_out_of_scope(cfg: dict) -> list[str]:
    """Raise UnsupportedVariantError / ConfigError for a config this library does not model exactly; returns notes
    on fields accepted because they have no effect on the text model."""
    _refuse_edge_variants(cfg)
    _refuse_attention_extras(cfg)
    activation = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in ACTIVATIONS:
        raise UnsupportedVariantError(f"hidden_activation={activation!r} is not modelled",
                                      f"use one of {', '.join(ACTIVATIONS)}")
    softcap = cfg.get("final_logit_softcapping")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
        raise ConfigError(f"final_logit_softcapping={softcap!r} must be a positive number or null",
                          "set final_logit_softcapping to e.g. 30.0, or null for no softcap")
    notes = []
    if cfg.get("use_double_wide_mlp"):
        notes.append("use_double_wide_mlp=true has no effect without KV sharing (transformers widens KV-shared layers only)")
    return notes


def _refuse_edge_variants(cfg: dict) -> None:
    ple = cfg.get("hidden_size_per_layer_input", _DEFAULT_PLE_WIDTH)
    if ple:
        where = "" if "hidden_size_per_layer_input" in cfg else " (absent: HF defaults it to 256)"
        raise UnsupportedVariantError(
            f"hidden_size_per_layer_input={ple}{where}: per-layer embeddings (Gemma 4 E2B/E4B) are not supported",
            "use the 26B-A4B or 31B model, or a config with hidden_size_per_layer_input: 0",
        )
    if cfg.get("num_kv_shared_layers", 0):
        raise UnsupportedVariantError(
            f"num_kv_shared_layers={cfg['num_kv_shared_layers']}: KV sharing (Gemma 4 E2B/E4B) is not supported",
            "use a config with num_kv_shared_layers: 0",
        )
    if cfg.get("use_bidirectional_attention") == "all":
        raise UnsupportedVariantError(
            "use_bidirectional_attention='all': bidirectional text attention is not supported (RL training is causal)",
            "use a causal Gemma 4 config (use_bidirectional_attention: null or 'vision')",
        )


def _refuse_attention_extras(cfg: dict) -> None:
    if cfg.get("attention_bias"):
        raise UnsupportedVariantError("attention_bias=true: q/k/v/o projection biases are not modelled",
                                      "use a config with attention_bias: false (every released Gemma 4 has none)")
    dropout = cfg.get("attention_dropout") or 0.0
    if dropout != 0.0:
        raise UnsupportedVariantError(f"attention_dropout={dropout}: attention dropout is not modelled (training "
                                      "would not be reproducible against transformers)", "set attention_dropout: 0.0")


def per_layer_overrides(cfg: dict, layer_types: list[str], global_head_dim: int,
                        global_kv: int | None) -> dict[int, dict[str, Any]]:
    """{layer index: {head_dim / num_key_value_heads}} as transformers resolves them: the saved `per_layer_config`,
    else the global head dim (and, with K=V, the global kv heads) on every full layer."""
    saved = cfg.get("per_layer_config")
    if saved is None:
        over: dict[str, Any] = {"head_dim": global_head_dim}
        if global_kv is not None:
            over["num_key_value_heads"] = global_kv
        return {i: dict(over) for i, t in enumerate(layer_types) if t == "full_attention"}
    if not isinstance(saved, dict):
        raise ConfigError("per_layer_config must map layer index to overrides", "re-save the config with transformers")
    out = {}
    for key, value in saved.items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"per_layer_config key {key!r} is not a layer index", "re-save the config") from None
        if not 0 <= idx < len(layer_types) or not isinstance(value, dict):
            raise ConfigError(f"per_layer_config entry {key!r} is out of range or not an object", "re-save the config")
        extra = sorted(set(value) - set(PER_LAYER_FIELDS))
        if extra:
            raise UnsupportedVariantError(f"per_layer_config[{key!r}] overrides {', '.join(extra)}: Gemma 4 varies "
                                          f"only {' and '.join(PER_LAYER_FIELDS)} per layer",
                                          "remove those per-layer overrides (set them globally)")
        out[idx] = value
    return out


def require_uniform_per_type(geometry: dict[str, set[tuple[int, int]]]) -> None:
    """Refuse layers of one attention type with different (head dim, kv heads): transformers builds one rotary
    table per type from a per-type config and refuses such a model."""
    for layer_type, shapes in geometry.items():
        if len(shapes) > 1:
            raise UnsupportedVariantError(
                f"per_layer_config gives {layer_type} layers different (head_dim, num_key_value_heads): "
                f"{sorted(shapes)}", "give every layer of one type the same head_dim and num_key_value_heads")
