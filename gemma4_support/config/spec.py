"""Read a Gemma 4 HF config (text `gemma4_text`, or the multimodal `gemma4` wrapper's `text_config`)
into a typed, per-layer model spec. Bad or out-of-scope configs raise ConfigError with the fix."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gemma4_support.config.scope import per_layer_overrides, refuse_out_of_scope, require_uniform_per_type
from gemma4_support.errors import ConfigError, UnsupportedVariantError, require_positive_ints

SLIDING = "sliding_attention"
FULL = "full_attention"
TEXT_MODEL_TYPE = "gemma4_text"
WRAPPER_MODEL_TYPE = "gemma4"

# HF Gemma4TextConfig defaults for fields that may be absent from a saved config (transformers 5.19).
_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
_DEFAULT_GLOBAL_HEAD_DIM = 512
_DEFAULT_PATTERN = 6  # layer i is full iff (i + 1) % 6 == 0
# Geometry we never default: a config without these is broken, not "default-sized".
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "intermediate_size", "sliding_window")


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
    """Load config.json from a model dir or file (or accept a dict); returns (dict, path or None)."""
    if isinstance(source, dict):
        return source, None
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no Gemma 4 config at {path}", "pass a model directory containing config.json")
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})", "repair or re-save the config") from None


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
    raise ConfigError(
        f"unknown model_type {model_type!r}: this suite reads Gemma 4 only",
        f"point it at a config whose model_type is {TEXT_MODEL_TYPE!r} or {WRAPPER_MODEL_TYPE!r}",
    )


def load_spec(source: str | Path | dict) -> ModelSpec:
    """Read a Gemma 4 config (dir, file or dict) into a ModelSpec, refusing what is out of scope."""
    raw, _ = read_config(source)
    cfg, wrapped = text_config(raw)
    notes: list[str] = refuse_out_of_scope(cfg)
    missing = [k for k in _REQUIRED if cfg.get(k) is None]
    if missing:
        raise ConfigError(f"config is missing required field(s) {', '.join(missing)}", "add them to config.json")
    require_positive_ints({key: cfg[key] for key in _REQUIRED}, ConfigError, "config field", "fix {name} in config.json")

    n = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        layer_types = [FULL if (i + 1) % _DEFAULT_PATTERN == 0 else SLIDING for i in range(n)]
        notes.append("layer_types absent: HF default 5 sliding : 1 full pattern used")
    if not isinstance(layer_types, list) or len(layer_types) != n:
        got = len(layer_types) if isinstance(layer_types, list) else type(layer_types).__name__
        raise ConfigError(
            f"layer_types has {got} entries but num_hidden_layers is {n}",
            "make layer_types list exactly one sliding_attention/full_attention entry per layer",
        )
    unknown = sorted({t for t in layer_types if t not in (SLIDING, FULL)})
    if unknown:
        raise ConfigError(f"layer_types contains unknown type(s) {unknown}", f"use only {SLIDING!r} and {FULL!r}")
    layer_types = list(layer_types)
    if layer_types[-1] != FULL:
        layer_types[-1] = FULL
        notes.append(f"last layer {n - 1} was {SLIDING}: forced to {FULL}, as HF transformers does")

    k_eq_v = bool(cfg.get("attention_k_eq_v", False))
    global_head_dim = cfg.get("global_head_dim", _DEFAULT_GLOBAL_HEAD_DIM)
    global_kv = cfg.get("num_global_key_value_heads") if k_eq_v else None
    per_layer = per_layer_overrides(cfg, layer_types, global_head_dim, global_kv)
    rope = _rope_specs(cfg, set(layer_types))
    moe = _moe_spec(cfg)
    q_heads = cfg["num_attention_heads"]

    layers = []
    for i, layer_type in enumerate(layer_types):
        over = per_layer.get(i, {})
        head_dim = int(over.get("head_dim", cfg["head_dim"]))
        kv_heads = int(over.get("num_key_value_heads", cfg["num_key_value_heads"]))
        if head_dim % 2 or q_heads % kv_heads:
            raise ConfigError(
                f"layer {i}: head_dim {head_dim} must be even and {q_heads} query heads divisible by {kv_heads} kv heads",
                "fix head_dim / num_key_value_heads (or the layer's per_layer_config entry)",
            )
        sliding = layer_type == SLIDING
        layers.append(LayerSpec(
            index=i, layer_type=layer_type, window=cfg["sliding_window"] if sliding else None,
            head_dim=head_dim, num_kv_heads=kv_heads, k_eq_v=k_eq_v and not sliding,
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
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_attention_heads=q_heads,
        intermediate_size=cfg["intermediate_size"], layers=tuple(layers), moe=moe,
        sliding_window=cfg["sliding_window"], max_position_embeddings=int(cfg.get("max_position_embeddings", 131_072)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=None if softcap is None else float(softcap),
        tie_word_embeddings=bool(tied),
        hidden_activation=cfg.get("hidden_activation", "gelu_pytorch_tanh"), pad_token_id=cfg.get("pad_token_id", 0),
        wrapped=wrapped, notes=tuple(notes),
    )


def _rope_specs(cfg: dict, layer_types: set[str]) -> dict[str, RopeSpec]:
    """One RopeSpec per layer type present (transformers builds a rotary table for those only)."""
    params = cfg.get("rope_parameters") or _DEFAULT_ROPE
    if not isinstance(params, dict):
        raise ConfigError("rope_parameters must map layer type to its RoPE parameters", "re-save the config with transformers")
    specs = {}
    for layer_type in sorted(layer_types):
        p = params.get(layer_type)
        if not isinstance(p, dict) or not isinstance(p.get("rope_theta"), (int, float)) or p["rope_theta"] <= 0:
            raise ConfigError(f"rope_parameters has no {layer_type!r} entry with a positive rope_theta",
                              "add it (see HF Gemma4TextConfig)")
        rope_type = p.get("rope_type", "default")
        if rope_type not in ("default", "proportional"):
            raise UnsupportedVariantError(f"rope_parameters[{layer_type!r}] rope_type {rope_type!r} is not supported",
                                          "use rope_type default or proportional")
        # transformers' default RoPE ignores both fields: the spec keeps the effective values
        proportional = rope_type == "proportional"
        factor = _number(p, "factor", layer_type) if proportional else 1.0
        partial = _number(p, "partial_rotary_factor", layer_type) if proportional else 1.0
        if factor <= 0 or not 0.0 <= partial <= 1.0:
            raise ConfigError(f"rope_parameters[{layer_type!r}] has factor={factor}, partial_rotary_factor={partial}",
                              "use factor > 0 and partial_rotary_factor in [0, 1]")
        specs[layer_type] = RopeSpec(rope_type, float(p["rope_theta"]), partial, factor)
    return specs


def _number(params: dict, key: str, layer_type: str) -> float:
    value = params.get(key, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"rope_parameters[{layer_type!r}][{key!r}] is {value!r}, not a number", f"set {key} to a number")
    return float(value)


def _moe_spec(cfg: dict) -> MoESpec | None:
    if not cfg.get("enable_moe_block", False):
        return None
    fields = {k: cfg.get(k) for k in ("num_experts", "top_k_experts", "moe_intermediate_size")}
    bad = [k for k, v in fields.items() if not isinstance(v, int) or v <= 0]
    if bad:
        raise ConfigError(f"enable_moe_block is true but {', '.join(bad)} is missing or not a positive integer",
                          "set num_experts, top_k_experts and moe_intermediate_size")
    if fields["top_k_experts"] > fields["num_experts"]:
        raise ConfigError(f"top_k_experts {fields['top_k_experts']} exceeds num_experts {fields['num_experts']}",
                          "lower top_k_experts")
    return MoESpec(fields["num_experts"], fields["top_k_experts"], fields["moe_intermediate_size"])
