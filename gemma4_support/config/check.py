"""One pass over every Gemma 4 config.json field this library reads: type, range and per-layer consistency (heads
against kv heads, even head widths, the window against max_position_embeddings). Every problem is collected and
`check_config` raises one ConfigError line naming them all, led by `scope.py`'s refusal of a well-typed variant the
library does not model, when there is one."""
from __future__ import annotations

import math
import re

from gemma4_support.config.hf_fields import (
    DEFAULT_GLOBAL_HEAD_DIM, DEFAULT_MAX_POSITIONS, FLOAT_DTYPES, FULL, MOE_FIELDS, REQUIRED, SLIDING, TEXT_MODEL_TYPE,
    WRAPPER_MODEL_TYPE, default_layer_types,
)
from gemma4_support.config.scope import model_type_error, per_layer_overrides, refuse_out_of_scope
from gemma4_support.errors import ConfigError, combined
from gemma4_support.errors import short_repr as _show

_HEADS, _WIDTH, _POSITIONS = 1024, 1 << 20, 1 << 24
# field -> (smallest, largest) integer accepted; the largest is a sanity bound far above every released Gemma 4
# (26B-A4B / 31B: hidden 5376, 60 layers, 32 heads, head dims 256/512, vocab 262,144, 262,144 positions).
INT_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24), "hidden_size": (1, 1 << 17), "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, _HEADS), "num_key_value_heads": (1, _HEADS), "num_global_key_value_heads": (1, _HEADS),
    "head_dim": (2, 8192), "global_head_dim": (2, 8192), "intermediate_size": (1, _WIDTH),
    "sliding_window": (1, _POSITIONS), "max_position_embeddings": (1, _POSITIONS),
    "num_experts": (1, 4096), "top_k_experts": (1, 4096), "moe_intermediate_size": (1, _WIDTH),
    "hidden_size_per_layer_input": (0, 1 << 17), "num_kv_shared_layers": (0, 1024),
}


def check_config(raw: object, where: str = "config.json") -> None:
    """Raise one ConfigError line listing every problem of a parsed config.json; return when it is well-formed."""
    problems = config_problems(raw)
    if problems:  # one kind of problem keeps its class (an out-of-scope variant: UnsupportedVariantError)
        kinds = {type(p) for p in problems}
        raise combined(problems, kinds.pop() if len(kinds) == 1 else ConfigError, where, one_line=True)


def config_problems(raw: object) -> list[ConfigError]:
    """Every type, range and consistency problem of a parsed config.json (empty when there is none)."""
    if not isinstance(raw, dict):
        return [ConfigError(f"the file holds a JSON {_kind(raw)}, not an object of config fields",
                            "point at the model's config.json as saved by transformers")]
    model_type = raw.get("model_type")
    if model_type == TEXT_MODEL_TYPE:
        return _text_problems(raw, "")
    if model_type != WRAPPER_MODEL_TYPE:
        return [model_type_error(model_type)]
    top = _Fields(raw, "")
    top.boolean("tie_word_embeddings")
    top.dtype()
    inner = raw.get("text_config")
    if not isinstance(inner, dict):
        return [*top.problems, ConfigError("gemma4 config has no text_config object",
                                           "save the multimodal config with its text_config")]
    return top.problems + _text_problems(inner, "text_config.")


class _Fields:
    """Typed reads of one config object that record a problem (and return None) instead of raising."""

    def __init__(self, cfg: dict, prefix: str) -> None:
        self.cfg, self.prefix = cfg, prefix
        self.problems: list[ConfigError] = []

    def add(self, problem: str, fix: str) -> None:
        """Record one problem with its fix."""
        self.problems.append(ConfigError(problem, fix))

    def name(self, *path: str) -> str:
        """The field's display name: the prefix, then the key path (later keys as subscripts)."""
        return self.prefix + path[0] + "".join(f"[{p!r}]" for p in path[1:])

    def integer(self, key: str, *, default: int | None = None, nullable: bool = False, lo: int | None = None,
                hi: int | None = None, obj: dict | None = None, path: tuple = ()) -> int | None:
        """An in-range integer field, or its default when absent (None, with a problem recorded, when ill-typed)."""
        obj = self.cfg if obj is None else obj
        if key not in obj or (obj[key] is None and nullable):
            return default
        low, high = INT_RANGES.get(key, (0, 0))
        low, high = low if lo is None else lo, high if hi is None else hi
        name, value = self.name(*path, key), obj[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(f"{name}={_show(value)} is not an integer", f"set {name} to an integer in {low}..{high}")
        elif not low <= value <= high:
            self.add(f"{name}={_show(value)} is out of range {low}..{high}", f"set {name} to an integer in {low}..{high}")
        else:
            return value
        return None

    def number(self, key: str, *, above: float, upto: float | None = None, closed: bool = False,
               nullable: bool = False, obj: dict | None = None, path: tuple = ()) -> float | None:
        """A finite in-range number field as a float (None when absent, or ill-typed with a problem recorded)."""
        obj = self.cfg if obj is None else obj
        if key not in obj or (obj[key] is None and nullable):
            return None
        name, value = self.name(*path, key), obj[key]
        span = f"{'>=' if closed else '>'} {above:g}" + ("" if upto is None else f" and <= {upto:g}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.add(f"{name}={_show(value)} is not a finite number", f"set {name} to a number {span}")
        elif (value < above if closed else value <= above) or (upto is not None and value > upto):
            self.add(f"{name}={_show(value)} is out of range", f"set {name} to a number {span}")
        else:
            return float(value)
        return None

    def boolean(self, key: str) -> bool:
        """Whether a true/false field is true (a non-boolean value records a problem)."""
        value = self.cfg.get(key)
        if value is not None and not isinstance(value, bool):
            self.add(f"{self.name(key)}={_show(value)} is not true/false", f"set {self.name(key)} to true or false")
        return value is True

    def string(self, key: str) -> None:
        """Record a problem when a field, if present, is not a string."""
        value = self.cfg.get(key)
        if value is not None and not isinstance(value, str):
            self.add(f"{self.name(key)}={_show(value)} is not a name",
                     f"set {self.name(key)} to a string (see HF Gemma4TextConfig)")

    def dtype(self) -> None:
        """Record a problem when dtype or torch_dtype, if present, is not a floating-point dtype name."""
        for key in ("dtype", "torch_dtype"):
            value = self.cfg.get(key)
            if value is not None and (not isinstance(value, str) or value.removeprefix("torch.") not in FLOAT_DTYPES):
                self.add(f"{self.name(key)}={_show(value)} is not a floating-point dtype name",
                         f"set {self.name(key)} to one of {', '.join(FLOAT_DTYPES)}")


def _text_problems(cfg: dict, prefix: str) -> list[ConfigError]:
    f = _Fields(cfg, prefix)
    missing = [k for k in REQUIRED if cfg.get(k) is None]
    if missing:
        f.add(f"missing required field(s) {', '.join(prefix + k for k in missing)}", "add them to config.json")
    max_positions = f.integer("max_position_embeddings", default=DEFAULT_MAX_POSITIONS)
    window = cfg.get("sliding_window")
    too_wide = type(window) is int and max_positions is not None and window > max_positions
    if too_wide:  # the window is read against the positions the model has
        f.add(f"{prefix}sliding_window={window} exceeds {prefix}max_position_embeddings={max_positions}",
              "set sliding_window to the model's window (at most max_position_embeddings)")
    got = {k: f.integer(k) for k in REQUIRED if k not in missing and not (too_wide and k == "sliding_window")}
    global_head_dim = f.integer("global_head_dim", default=DEFAULT_GLOBAL_HEAD_DIM)
    global_kv = f.integer("num_global_key_value_heads", nullable=True)
    k_eq_v, moe = f.boolean("attention_k_eq_v"), f.boolean("enable_moe_block")
    f.boolean("tie_word_embeddings")
    f.number("rms_norm_eps", above=0.0, upto=1.0)
    f.dtype()
    _scope(f)
    if got.get("vocab_size") is not None:  # HF's embedding takes it as padding_idx: a row of the table
        f.integer("pad_token_id", nullable=True, lo=0, hi=got["vocab_size"] - 1)
    if moe:
        _moe(f)
    n = got.get("num_hidden_layers")
    layer_types = _layer_types(f, n)
    _rope(f, set(layer_types or ()))
    if n is not None:
        _per_layer_entries(f, n)
    if f.problems or layer_types is None:
        return f.problems
    try:
        over = per_layer_overrides(cfg, layer_types, global_head_dim, global_kv if k_eq_v else None)
    except ConfigError:  # a well-typed override transformers does not vary per layer: scope.py names it
        return f.problems
    _geometry(f, layer_types, over, got)
    return f.problems


def _scope(f: _Fields) -> None:
    """The fields scope.py reads, typed; then its refusal of an out-of-scope variant, listed first."""
    before = len(f.problems)
    for key in ("hidden_size_per_layer_input", "num_kv_shared_layers"):
        f.integer(key, nullable=True)
    for key in ("attention_bias", "use_double_wide_mlp"):
        f.boolean(key)
    for key in ("hidden_activation", "use_bidirectional_attention"):
        f.string(key)
    f.number("final_logit_softcapping", above=0.0, nullable=True)
    f.number("attention_dropout", above=0.0, upto=1.0, closed=True, nullable=True)
    if len(f.problems) == before:
        try:
            refuse_out_of_scope(f.cfg)
        except ConfigError as refusal:
            f.problems.insert(0, refusal)


def _moe(f: _Fields) -> None:
    missing = [k for k in MOE_FIELDS if f.cfg.get(k) is None]
    if missing:
        f.add(f"enable_moe_block is true but {', '.join(f.prefix + k for k in missing)} is missing",
              "set num_experts, top_k_experts and moe_intermediate_size")
    got = {k: f.integer(k) for k in MOE_FIELDS if k not in missing}
    experts, top_k = got.get("num_experts"), got.get("top_k_experts")
    if experts is not None and top_k is not None and top_k > experts:
        f.add(f"{f.prefix}top_k_experts={top_k} exceeds {f.prefix}num_experts={experts}", "lower top_k_experts")


def _layer_types(f: _Fields, n: int | None) -> list[str] | None:
    """The per-layer types as resolved (HF's default pattern when absent; the last layer forced to full)."""
    value = f.cfg.get("layer_types")
    if value is None:
        return default_layer_types(n) if n is not None else None
    name = f.name("layer_types")
    if not isinstance(value, list) or not value:
        f.add(f"{name} is {_show(value)}, not a list of layer types",
              f"list one {SLIDING!r} or {FULL!r} entry per layer")
        return None
    unknown = sorted({_show(t) for t in value if t not in (SLIDING, FULL)})
    if unknown:
        f.add(f"{name} contains unknown type(s) {', '.join(unknown)}", f"use only {SLIDING!r} and {FULL!r}")
    if n is not None and len(value) != n:
        f.add(f"{name} has {len(value)} entries but num_hidden_layers is {n}",
              "make layer_types list exactly one sliding_attention/full_attention entry per layer")
    if unknown or (n is not None and len(value) != n):
        return None
    return [*value[:-1], FULL]


def _rope(f: _Fields, present: set[str]) -> None:
    params = f.cfg.get("rope_parameters")
    if params is None or params == {}:
        return
    name = f.name("rope_parameters")
    if not isinstance(params, dict):
        f.add(f"{name} is {_show(params)}, not an object mapping layer type to its RoPE parameters",
              "re-save the config with transformers")
        return
    for layer_type in (SLIDING, FULL):
        entry = params.get(layer_type)
        if entry is None:
            if layer_type in present:
                f.add(f"{name} has no {layer_type!r} entry with a positive rope_theta", "add it (see HF Gemma4TextConfig)")
            continue
        if not isinstance(entry, dict):
            f.add(f"{name}[{layer_type!r}] is {_show(entry)}, not an object", "re-save the config with transformers")
            continue
        path = ("rope_parameters", layer_type)
        if "rope_theta" not in entry:
            f.add(f"{name}[{layer_type!r}] has no rope_theta", "add a positive rope_theta")
        f.number("rope_theta", above=0.0, obj=entry, path=path)
        rope_type = entry.get("rope_type", "default")
        if not isinstance(rope_type, str):
            f.add(f"{name}[{layer_type!r}]['rope_type']={_show(rope_type)} is not a name",
                  "use rope_type default or proportional")
        elif rope_type == "proportional":  # default RoPE ignores both (as transformers does)
            f.number("factor", above=0.0, obj=entry, path=path)
            f.number("partial_rotary_factor", above=0.0, upto=1.0, closed=True, obj=entry, path=path)


def _per_layer_entries(f: _Fields, n: int) -> None:
    saved = f.cfg.get("per_layer_config")
    if saved is None:
        return
    if not isinstance(saved, dict):
        f.add(f"{f.name('per_layer_config')} is {_show(saved)}, not an object mapping layer index to overrides",
              "re-save the config with transformers")
        return
    for key, entry in saved.items():
        if not re.fullmatch(r"\d{1,6}", str(key), re.ASCII) or int(key) >= n or not isinstance(entry, dict):
            f.add(f"{f.name('per_layer_config')} entry {_show(key)} is not a layer index in 0..{n - 1} with an object",
                  "re-save the config with transformers")
            continue
        for field in ("head_dim", "num_key_value_heads"):
            f.integer(field, obj=entry, path=("per_layer_config", str(key)))
        odd = [_show(k) for k in entry if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", str(k), re.ASCII)]
        if odd:  # well-named overrides of other fields are refused by scope.py, naming them
            f.add(f"{f.name('per_layer_config', str(key))} has key(s) {', '.join(odd)} that are not field names",
                  "re-save the config with transformers")


def _geometry(f: _Fields, layer_types: list[str], over: dict[int, dict], got: dict[str, int | None]) -> None:
    """Every layer's resolved head width is even and its kv heads divide the query heads (grouped by problem)."""
    heads = got["num_attention_heads"]
    found: dict[tuple[str, str], list[int]] = {}
    for i in range(len(layer_types)):
        head_dim = over.get(i, {}).get("head_dim", got["head_dim"])
        kv = over.get(i, {}).get("num_key_value_heads", got["num_key_value_heads"])
        if head_dim % 2:
            found.setdefault((f"head_dim {head_dim} is odd (RoPE rotates pairs of lanes)",
                              "fix head_dim / global_head_dim (or the layer's per_layer_config entry)"), []).append(i)
        if heads % kv:
            found.setdefault((f"{heads} query heads are not divisible by {kv} kv heads",
                              "fix num_attention_heads / num_key_value_heads / num_global_key_value_heads "
                              "(or the layer's per_layer_config entry)"), []).append(i)
    for (problem, fix), layers in found.items():
        shown = ", ".join(map(str, layers[:8])) + (f" (+{len(layers) - 8} more)" if len(layers) > 8 else "")
        f.add(f"layer {shown}: {problem}", fix)


def _kind(value: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)
