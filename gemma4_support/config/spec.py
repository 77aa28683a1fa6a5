"""Read a Gemma 4 HF config (text `gemma4_text`, or the multimodal `gemma4` wrapper's `text_config`)
into a typed, per-layer model spec. Bad or out-of-scope configs raise ConfigError with the fix."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gemma4_support.config.check import check_config
from gemma4_support.config.hf_fields import (
    DEFAULT_ACTIVATION, DEFAULT_GLOBAL_HEAD_DIM, DEFAULT_MAX_POSITIONS, DEFAULT_RMS_NORM_EPS, DEFAULT_ROPE, FULL,
    SLIDING, TEXT_MODEL_TYPE, WRAPPER_MODEL_TYPE, default_layer_types,
)
from gemma4_support.config.scope import (
    model_type_error, per_layer_overrides, refuse_out_of_scope, require_uniform_per_type,
)
from gemma4_support.errors import ConfigError, UnsupportedVariantError

__all__ = ["FULL", "SLIDING", "TEXT_MODEL_TYPE", "WRAPPER_MODEL_TYPE", "LayerSpec", "ModelSpec", "MoESpec", "RopeSpec",
           "config_fingerprint", "load_spec", "read_config", "text_config"]


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer: type, theta, and the fraction of frequency pairs that rotate."""

    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0  # proportional RoPE divides its frequencies by it (transformers ignores it on default RoPE)


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer's attention geometry and MLP kind."""

    index: int
    layer_type: str  # SLIDING or FULL
    window: int | None  # W keys including self, None on full layers
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # V is the raw k_proj output (no v_proj)
    rope: RopeSpec
    mlp: str  # "moe" or "dense"

    @property
    def is_sliding(self) -> bool:
        """True on sliding-window layers."""
        return self.layer_type == SLIDING


@dataclass(frozen=True)
class MoESpec:
    """Routed-experts geometry of MoE layers."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything the stack needs to know about a Gemma 4 text model, per layer."""

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int  # the dense MLP (the "shared expert" on MoE layers)
    layers: tuple[LayerSpec, ...]
    moe: MoESpec | None
    sliding_window: int
    max_position_embeddings: int
    rms_norm_eps: float
    final_logit_softcapping: float | None
    tie_word_embeddings: bool
    hidden_activation: str
    pad_token_id: int | None  # HF's embedding treats it as padding_idx: its row gets no gradient from lookups
    wrapped: bool  # read from a multimodal `gemma4` wrapper's text_config
    notes: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int:
        """Decoder depth."""
        return len(self.layers)

    @property
    def layer_types(self) -> list[str]:
        """Per-layer attention type, as in HF's `layer_types`."""
        return [layer.layer_type for layer in self.layers]

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence the model supports (its RoPE table length)."""
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def read_config(source: str | Path | dict) -> tuple[dict, Path | None]:
    """Load config.json from a model dir or file (or accept a dict); returns (parsed JSON, path or None). The JSON
    is not checked here: `load_spec` and `check.check_config` do that."""
    if isinstance(source, dict):
        return source, None
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no Gemma 4 config at {path}", "pass a model directory containing config.json")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc})", "make the file readable") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                          "re-save the config as UTF-8 JSON") from None
    try:
        return json.loads(text), path
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", "repair or re-save the config") from None
    except (ValueError, RecursionError) as exc:  # integers beyond Python's digit limit, absurd nesting
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ConfigError(f"{path} is not a readable JSON config ({reason})", "repair or re-save the config") from None


def config_fingerprint(config: dict) -> str:
    """Stable short hash of a config dict (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def text_config(config: dict) -> tuple[dict, bool]:
    """The text-model part of a config and whether it came from the multimodal wrapper."""
    model_type = config.get("model_type")
    if model_type == WRAPPER_MODEL_TYPE:
        inner = config.get("text_config")
        if not isinstance(inner, dict):
            raise ConfigError("gemma4 config has no text_config object", "save the multimodal config with its text_config")
        return inner, True
    if model_type == TEXT_MODEL_TYPE:
        return config, False
    raise model_type_error(model_type)


def load_spec(source: str | Path | dict) -> ModelSpec:
    """Read a Gemma 4 config (dir, file or dict) into a ModelSpec: every field checked first (all problems in one
    line), then what is out of scope refused."""
    raw, path = read_config(source)
    check_config(raw, str(path) if path else "config")
    cfg, wrapped = text_config(raw)
    notes: list[str] = refuse_out_of_scope(cfg)
    n = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        layer_types = default_layer_types(n)
        notes.append("layer_types absent: HF default 5 sliding : 1 full pattern used")
    layer_types = list(layer_types)
    if layer_types[-1] != FULL:
        layer_types[-1] = FULL
        notes.append(f"last layer {n - 1} was {SLIDING}: forced to {FULL}, as HF transformers does")

    k_eq_v = cfg.get("attention_k_eq_v") is True
    global_kv = cfg.get("num_global_key_value_heads") if k_eq_v else None
    per_layer = per_layer_overrides(cfg, layer_types, cfg.get("global_head_dim", DEFAULT_GLOBAL_HEAD_DIM), global_kv)
    rope = _rope_specs(cfg, set(layer_types))
    moe = _moe_spec(cfg)
    layers = []
    for i, layer_type in enumerate(layer_types):
        over = per_layer.get(i, {})
        sliding = layer_type == SLIDING
        layers.append(LayerSpec(
            index=i, layer_type=layer_type, window=cfg["sliding_window"] if sliding else None,
            head_dim=over.get("head_dim", cfg["head_dim"]),
            num_kv_heads=over.get("num_key_value_heads", cfg["num_key_value_heads"]), k_eq_v=k_eq_v and not sliding,
            rope=rope[layer_type], mlp="moe" if moe else "dense",
        ))
    geometry: dict[str, set[tuple[int, int]]] = {}
    for layer in layers:
        geometry.setdefault(layer.layer_type, set()).add((layer.head_dim, layer.num_kv_heads))
    require_uniform_per_type(geometry)
    softcap = cfg.get("final_logit_softcapping")
    # The wrapper's lm_head is tied (or not) by the wrapper's own field: transformers ties
    # Gemma4ForConditionalGeneration's weights from its top-level config, never from text_config.
    tied = raw.get("tie_word_embeddings", True) if wrapped else cfg.get("tie_word_embeddings", True)
    return ModelSpec(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"], layers=tuple(layers), moe=moe,
        sliding_window=cfg["sliding_window"],
        max_position_embeddings=cfg.get("max_position_embeddings", DEFAULT_MAX_POSITIONS),
        rms_norm_eps=float(cfg.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS)),
        final_logit_softcapping=None if softcap is None else float(softcap),
        tie_word_embeddings=bool(tied),
        hidden_activation=cfg.get("hidden_activation", DEFAULT_ACTIVATION), pad_token_id=cfg.get("pad_token_id", 0),
        wrapped=wrapped, notes=tuple(notes),
    )


def _rope_specs(cfg: dict, layer_types: set[str]) -> dict[str, RopeSpec]:
    """One RopeSpec per layer type present (transformers builds a rotary table for those only)."""
    params = cfg.get("rope_parameters") or DEFAULT_ROPE
    specs = {}
    for layer_type in sorted(layer_types):
        p = params[layer_type]
        rope_type = p.get("rope_type", "default")
        if rope_type not in ("default", "proportional"):
            raise UnsupportedVariantError(f"rope_parameters[{layer_type!r}] rope_type {rope_type!r} is not supported",
                                          "use rope_type default or proportional")
        # transformers' default RoPE ignores both fields: the spec keeps the effective values
        proportional = rope_type == "proportional"
        factor = float(p.get("factor", 1.0)) if proportional else 1.0
        partial = float(p.get("partial_rotary_factor", 1.0)) if proportional else 1.0
        specs[layer_type] = RopeSpec(rope_type, float(p["rope_theta"]), partial, factor)
    return specs


def _moe_spec(cfg: dict) -> MoESpec | None:
    if cfg.get("enable_moe_block") is not True:
        return None
    return MoESpec(cfg["num_experts"], cfg["top_k_experts"], cfg["moe_intermediate_size"])
