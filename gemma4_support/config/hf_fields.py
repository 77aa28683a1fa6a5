"""Names and HF defaults of the Gemma 4 config fields this library reads (transformers 5.19 `Gemma4TextConfig`),
shared by the spec reader (`spec.py`) and the field checker (`check.py`)."""
from __future__ import annotations

SLIDING = "sliding_attention"
FULL = "full_attention"
TEXT_MODEL_TYPE = "gemma4_text"
WRAPPER_MODEL_TYPE = "gemma4"

# HF Gemma4TextConfig defaults for fields that may be absent from a saved config.
DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
DEFAULT_GLOBAL_HEAD_DIM = 512
DEFAULT_PATTERN = 6  # layer i is full iff (i + 1) % 6 == 0
DEFAULT_MAX_POSITIONS = 131_072
DEFAULT_RMS_NORM_EPS = 1e-6
DEFAULT_ACTIVATION = "gelu_pytorch_tanh"
# Geometry we never default: a config without these is broken, not "default-sized".
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "sliding_window")
MOE_FIELDS = ("num_experts", "top_k_experts", "moe_intermediate_size")
# torch dtype names a config may declare (`dtype`, or `torch_dtype` before transformers 4.56).
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e5m2")


def default_layer_types(num_layers: int) -> list[str]:
    """HF's pattern when `layer_types` is absent: 5 sliding, then 1 full."""
    return [FULL if (i + 1) % DEFAULT_PATTERN == 0 else SLIDING for i in range(num_layers)]


def declared_dtype(config: dict) -> str | None:
    """The torch dtype name a config declares for its weights (a wrapper's own field first), or None."""
    inner = config.get("text_config") if config.get("model_type") == WRAPPER_MODEL_TYPE else None
    for where in (config, inner if isinstance(inner, dict) else {}):
        for key in ("dtype", "torch_dtype"):
            value = where.get(key)
            if isinstance(value, str):
                return value.removeprefix("torch.")
    return None
