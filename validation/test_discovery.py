"""Stage discovery: a Gemma 4 config read into per-layer geometry and layer families, checked against HF
transformers' own resolution of the same config, on the fixtures, the real 26B-A4B / 31B shapes and
non-periodic patterns; bad configs give one readable error naming the field. A hypothesis search over tiny configs
(patterns, windows, head widths, K=V, routing, RoPE, softcap, tying, activations, refused fields) builds each in
transformers with random weights: it is refused in one line naming the field, or passes one fp32 parity step."""
from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.configs import multimodal_wrapper, real_config
from gemma4_support.config.families import discover, truncate_config
from gemma4_support.config.spec import FULL, SLIDING, ModelSpec, load_spec, read_config
from gemma4_support.errors import ConfigError, UnsupportedVariantError
from validation.thresholds import DISCOVERY_AGREEMENT

pytestmark = pytest.mark.stage_discovery


def hf_layers(config: dict) -> list[tuple[str, int, int]]:
    """HF transformers' resolution of (layer type, head dim, kv heads) per layer."""
    import transformers
    from transformers import Gemma4TextConfig

    transformers.logging.set_verbosity_error()
    text = config["text_config"] if config.get("model_type") == "gemma4" else config
    hf = Gemma4TextConfig(**{k: v for k, v in text.items() if k not in ("model_type", "architectures")})
    return [(t, hf.per_layer_config[i].head_dim, hf.per_layer_config[i].num_key_value_heads)
            for i, t in enumerate(hf.layer_types)]


def agreement(spec: ModelSpec, config: dict) -> dict[str, float]:
    """How many layers our spec resolves differently from HF (type, head dim, kv heads, window)."""
    ref = hf_layers(config)
    ours = [(layer.layer_type, layer.head_dim, layer.num_kv_heads) for layer in spec.layers]
    window_errors = sum(
        (layer.window != spec.sliding_window) if layer.is_sliding else (layer.window is not None) for layer in spec.layers)
    return {
        "layers": float(len(ref)),
        "layer_count_diff": float(abs(len(ref) - len(ours))),
        "type_mismatches": float(sum(a[0] != b[0] for a, b in zip(ref, ours))),
        "geometry_mismatches": float(sum(a[1:] != b[1:] for a, b in zip(ref, ours))),
        "window_errors": float(window_errors),
    }


def expected_families(layer_types: list[str], mlp: str) -> dict[str, int]:
    """Brute-force first index per family, straight from a resolved layer_types list."""
    out = {}
    for t in (SLIDING, FULL):
        if t in layer_types:
            out[t] = layer_types.index(t)
    out[f"{mlp}_mlp"] = 0
    return out


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_fixture_discovery(variant, stage_report):
    from fixtures.factory import fixture_dir

    path = fixture_dir(variant)
    config, _ = read_config(path)
    spec = load_spec(path)
    found = discover(spec)
    stage_report.check(f"fixture/{variant}", agreement(spec, config), DISCOVERY_AGREEMENT,
                       discovery=found.to_dict(), layer_types=spec.layer_types)
    assert {f.name: f.first_index for f in found.families} == expected_families(spec.layer_types, spec.layers[0].mlp)
    assert found.covering_depth == 6 and found.truncation_depth == 6
    assert (spec.moe is not None) == (variant == "moe")
    assert any(layer.k_eq_v for layer in spec.layers) and not any(l.k_eq_v for l in spec.layers if l.is_sliding)


def test_model_under_test(gemma4_model_dir, model_spec, stage_report):
    config, _ = read_config(gemma4_model_dir)
    found = discover(model_spec)
    stage_report.check(f"model/{gemma4_model_dir.name}", agreement(model_spec, config), DISCOVERY_AGREEMENT,
                       discovery=found.to_dict(), max_sequence_length=model_spec.max_sequence_length)


@pytest.mark.parametrize("name,mlp,full_kv", [("26B-A4B", "moe", 2), ("31B", "dense", 4)])
@pytest.mark.parametrize("wrapped", [False, True])
def test_real_shapes(name, mlp, full_kv, wrapped, stage_report):
    config = real_config(name)
    if wrapped:
        config = multimodal_wrapper(config)
    spec = load_spec(config)
    found = discover(spec)
    stage_report.check(f"real/{name}{'/wrapped' if wrapped else ''}", agreement(spec, config), DISCOVERY_AGREEMENT,
                       discovery=found.to_dict())
    assert spec.wrapped == wrapped
    assert {f.name: f.first_index for f in found.families} == {SLIDING: 0, FULL: 5, f"{mlp}_mlp": 0}
    assert found.covering_depth == found.truncation_depth == 6
    full = spec.layers[5]
    assert (full.head_dim, full.num_kv_heads, full.k_eq_v, full.window) == (512, full_kv, True, None)
    assert full.rope.rope_type == "proportional" and full.rope.partial_rotary_factor == 0.25 and full.rope.theta == 1e6
    assert spec.layers[0].window == 1024 and spec.layers[0].head_dim == 256 and spec.layers[0].rope.theta == 1e4
    assert spec.max_sequence_length == 262_144


def _with_types(types: list[str]) -> dict:
    config = real_config("26B-A4B")
    config.update(num_hidden_layers=len(types), layer_types=types)
    return config


S, F = SLIDING, FULL


@pytest.mark.parametrize("types,first_full,covering,truncation,note", [
    ([S, S, F, F], 2, 3, 3, False),          # not periodic
    ([F, S, S, S, S, F], 0, 2, 6, False),    # full first: the 2-layer cut would end on a sliding layer
    ([S, S, S, S, S, S], 5, 6, 6, True),     # all sliding: HF forces the last layer to full
    ([S, F, S, F, S, F, S, F], 1, 2, 2, False),
])
def test_non_periodic_patterns(types, first_full, covering, truncation, note, stage_report):
    config = _with_types(types)
    spec = load_spec(config)
    found = discover(spec)
    stage_report.check(f"pattern/{''.join(t[0] for t in types)}", agreement(spec, config), DISCOVERY_AGREEMENT,
                       discovery=found.to_dict())
    assert found.family(FULL).first_index == first_full
    assert (found.covering_depth, found.truncation_depth) == (covering, truncation)
    assert bool(spec.notes) == note
    cut = load_spec(truncate_config(config, found.truncation_depth))
    assert cut.layer_types == spec.layer_types[:truncation]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([S, F]), min_size=1, max_size=14))
def test_random_patterns_match_hf(types):
    config = _with_types(list(types))
    spec = load_spec(config)
    m = agreement(spec, config)
    assert m["type_mismatches"] == m["geometry_mismatches"] == m["window_errors"] == m["layer_count_diff"] == 0
    resolved = spec.layer_types
    found = discover(spec)
    assert {f.name: f.first_index for f in found.families} == expected_families(resolved, "moe")
    assert resolved[found.truncation_depth - 1] == FULL
    assert found.covering_depth == max(expected_families(resolved, "moe").values()) + 1


def test_sensitivity_periodic_assumption_is_caught(stage_report):
    """A reader that assumes the 5:1 period instead of reading layer_types must fail the agreement gate."""
    config = _with_types([S, S, F, F, S, F])
    spec = load_spec(config)
    periodic = [dataclasses.replace(layer, layer_type=F if (i + 1) % 6 == 0 else S,
                                    window=None if (i + 1) % 6 == 0 else spec.sliding_window)
                for i, layer in enumerate(spec.layers)]
    broken = dataclasses.replace(spec, layers=tuple(periodic))
    stage_report.expect_caught("sensitivity/periodic-assumption", agreement(broken, config), DISCOVERY_AGREEMENT)


def test_sensitivity_global_geometry_on_sliding_is_caught(stage_report):
    """Giving sliding layers the global head dim (a per-layer geometry mix-up) must fail the gate."""
    config = real_config("26B-A4B")
    spec = load_spec(config)
    broken = dataclasses.replace(spec, layers=tuple(
        dataclasses.replace(l, head_dim=512) if l.index == 0 else l for l in spec.layers))
    stage_report.expect_caught("sensitivity/sliding-with-global-head-dim", agreement(broken, config), DISCOVERY_AGREEMENT)


def _bad(**changes) -> dict:
    config = real_config("26B-A4B")
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key)
        else:
            config[key] = value
    return config


_DROP = object()


@pytest.mark.parametrize("config,error,field", [
    (_bad(hidden_size_per_layer_input=256), UnsupportedVariantError, "hidden_size_per_layer_input"),
    (_bad(hidden_size_per_layer_input=_DROP), UnsupportedVariantError, "hidden_size_per_layer_input"),
    (_bad(num_kv_shared_layers=10), UnsupportedVariantError, "num_kv_shared_layers"),
    (_bad(use_bidirectional_attention="all"), UnsupportedVariantError, "use_bidirectional_attention"),
    (_bad(layer_types=[S] * 29), ConfigError, "layer_types"),
    (_bad(layer_types=[S] * 29 + ["chunked_attention"]), ConfigError, "layer_types"),
    (_bad(model_type="gemma3_text"), ConfigError, "model_type"),
    (_bad(hidden_size=_DROP), ConfigError, "hidden_size"),
    (_bad(head_dim=0), ConfigError, "head_dim"),
    (_bad(num_experts=None), ConfigError, "num_experts"),
    (_bad(top_k_experts=500), ConfigError, "top_k_experts"),
    (_bad(per_layer_config={"x": {}}), ConfigError, "per_layer_config"),
    (_bad(rope_parameters={"sliding_attention": {"rope_theta": 1.0}}), ConfigError, "rope_parameters"),
    ({"model_type": "gemma4"}, ConfigError, "text_config"),
    (_bad(rope_parameters={"sliding_attention": {"rope_theta": 1e4},
                           "full_attention": {"rope_type": "proportional", "rope_theta": 1e6, "factor": 0.0}}),
     ConfigError, "factor"),
    (_bad(rope_parameters={"sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4},
                           "full_attention": {"rope_type": "proportional", "rope_theta": 1e6}}),
     UnsupportedVariantError, "rope_type"),
    (_bad(attention_bias=True), UnsupportedVariantError, "attention_bias"),
    (_bad(attention_dropout=0.1), UnsupportedVariantError, "attention_dropout"),
    (_bad(hidden_activation="gelu_new"), UnsupportedVariantError, "hidden_activation"),
    (_bad(final_logit_softcapping=0.0), ConfigError, "final_logit_softcapping"),
    (_bad(per_layer_config={"5": {"head_dim": 512, "intermediate_size": 64}}), UnsupportedVariantError, "intermediate_size"),
    (_bad(per_layer_config={"5": {"head_dim": 512}, "11": {"head_dim": 256}}), UnsupportedVariantError, "per_layer_config"),
])
def test_bad_configs_give_one_clear_line(config, error, field):
    with pytest.raises(error) as info:
        load_spec(config)
    message = str(info.value)
    assert field in message and "fix:" in message and "\n" not in message


@pytest.mark.parametrize("config_class",
                         ["Gemma4UnifiedConfig", "Gemma4AssistantConfig", "Gemma4UnifiedAssistantConfig"])
def test_gemma4_siblings_are_refused_by_name(config_class: str, tmp_path) -> None:
    """The other Gemma 4 model types transformers registers (the 12B unified model, the speculative-decoding drafters),
    as its save_pretrained writes them: refused as out of scope in one line naming the model_type and the fix — not
    as an unknown model family, and not read as a decoder."""
    import transformers

    getattr(transformers, config_class)().save_pretrained(tmp_path)
    model_type = json.loads((tmp_path / "config.json").read_text())["model_type"]
    with pytest.raises(UnsupportedVariantError) as info:
        load_spec(tmp_path)
    message = str(info.value)
    assert repr(model_type) in message and "26B-A4B and 31B" in message and "fix:" in message
    assert "\n" not in message and "unknown" not in message


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no Gemma 4 config"):
        load_spec(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_spec(tmp_path)


def test_window_is_read_against_max_position_embeddings():
    """A window up to max_position_embeddings (HF's 131,072 when absent) is accepted; one key more is refused."""
    config = real_config("26B-A4B")
    config.update(sliding_window=262_144)
    assert load_spec(config).sliding_window == 262_144
    config.update(sliding_window=262_145)
    with pytest.raises(ConfigError, match="sliding_window=262145 exceeds max_position_embeddings=262144"):
        load_spec(config)
    del config["max_position_embeddings"]
    config.update(sliding_window=131_072)
    assert load_spec(config).max_position_embeddings == 131_072
    config.update(sliding_window=131_073)
    with pytest.raises(ConfigError, match="exceeds max_position_embeddings=131072"):
        load_spec(config)


def test_truncation_refuses_to_end_on_sliding():
    with pytest.raises(ConfigError, match="truncation_depth"):
        truncate_config(real_config("26B-A4B"), 3)
    cut = truncate_config(multimodal_wrapper(real_config("26B-A4B")), 6)
    assert load_spec(cut).num_layers == 6 and json.dumps(cut)


# ---------------------------------------------------------------- the config search: modelled exactly, or refused

# Fields the library refuses (each changes the math of a model transformers builds), drawn now and then.
REFUSAL_TRIGGERS = {
    "attention_bias": {"attention_bias": True},
    "attention_dropout": {"attention_dropout": 0.25},
    "hidden_activation": {"hidden_activation": "gelu_new"},
    "hidden_size_per_layer_input": {"hidden_size_per_layer_input": 8},
    "num_kv_shared_layers": {"num_kv_shared_layers": 1},
    "use_bidirectional_attention": {"use_bidirectional_attention": "all"},
    "per_layer_config": {"per_layer_config": {"0": {"intermediate_size": 32}}},
}
ROPES = (
    None,  # transformers' defaults: default 1e4 sliding, proportional 0.25 / 1e6 full
    {S: {"rope_type": "default", "rope_theta": 5e4},
     F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e5, "factor": 2.0}},
    {S: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4},
     F: {"rope_type": "default", "rope_theta": 1e6}},
)


@st.composite
def search_configs(draw: st.DrawFn) -> tuple[dict, str | None, int]:
    """(a tiny text config, the refusal trigger planted in it or None, a weight seed). Whether the model is MoE and
    which refusal trigger (one in three) come from the seed, so they stay balanced over a derandomized run."""
    import random

    from fixtures.configs import tiny_text_config

    seed = draw(st.integers(0, 2**16))
    layers = draw(st.integers(1, 4))
    heads = draw(st.sampled_from([1, 2, 4]))
    divisors = [d for d in (1, 2, 4) if heads % d == 0]
    config = tiny_text_config(
        num_hidden_layers=layers, layer_types=draw(st.lists(st.sampled_from([S, F]), min_size=layers, max_size=layers)),
        num_attention_heads=heads, num_key_value_heads=draw(st.sampled_from(divisors)),
        head_dim=draw(st.sampled_from([16, 32, 64])), global_head_dim=draw(st.sampled_from([16, 32, 64, 128])),
        attention_k_eq_v=draw(st.booleans()), num_global_key_value_heads=draw(st.sampled_from([None, *divisors])),
        sliding_window=draw(st.sampled_from([1, 2, 3, 4, 7, 1024])),  # 1024: the tiny max_position_embeddings
        final_logit_softcapping=draw(st.sampled_from([None, 30.0, 3.0])), tie_word_embeddings=draw(st.booleans()),
        hidden_activation=draw(st.sampled_from(["gelu_pytorch_tanh", "gelu", "silu", "relu"])),
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-2])), rope_parameters=draw(st.sampled_from(ROPES)),
        pad_token_id=draw(st.sampled_from([0, 7, None])), use_double_wide_mlp=draw(st.booleans()))
    rng = random.Random(f"{seed}:{json.dumps(config, sort_keys=True)}")  # hypothesis' small seeds repeat
    if rng.random() < 0.6:
        experts = draw(st.integers(1, 8))
        config.update(enable_moe_block=True, num_experts=experts, top_k_experts=draw(st.integers(1, experts)),
                      moe_intermediate_size=draw(st.sampled_from([16, 32])))
    trigger = rng.choice(sorted(REFUSAL_TRIGGERS)) if rng.random() < 1 / 3 else None
    config.update(REFUSAL_TRIGGERS.get(trigger, {}))
    return config, trigger, seed


def one_line_refusal(error: Exception, field: str | None) -> None:
    """A refusal is a ConfigError of one line with its fix, naming the planted field when there is one."""
    message = str(error)
    assert isinstance(error, ConfigError) and "fix:" in message and "\n" not in message, message
    assert field is None or field in message, f"refusal does not name {field}: {message}"


def parity_search_body(stats, break_spec=None):
    """One example of the search: transformers builds the config with random weights; the library refuses it in one
    line, or builds Megatron and passes one fp32 parity step (forward, loss, gradients) on a packed row."""
    import copy

    from gemma4_support.convert.checkpoint import TensorDict, load_hf_weights
    from gemma4_support.metrics import evaluate
    from gemma4_support.model.build import build_model
    from validation.hf_checkpoints import random_hf_model, saved_config
    from validation.parity import fp32_gates, fp32_step, packed_lengths, random_row

    def body(example: tuple[dict, str | None, int]) -> None:
        config, trigger, seed = example
        try:
            hf = random_hf_model(config, seed)
        except Exception:  # noqa: BLE001 - transformers cannot build it: the library must refuse it too
            stats["hf_unbuildable"] += 1
            with pytest.raises(ConfigError) as info:
                load_spec({**config, "model_type": "gemma4_text"})
            one_line_refusal(info.value, trigger)
            stats["refused"] += 1
            stats[f"refused:{trigger}"] += 1
            return
        try:
            spec = load_spec(saved_config(hf))
            model = build_model(break_spec(spec) if break_spec else spec)
        except ConfigError as error:
            assert trigger is not None, f"a config without a refusal trigger was refused: {error}"
            one_line_refusal(error, trigger)
            stats["refused"] += 1
            stats[f"refused:{trigger}"] += 1
            stats["refused_by_megatron_core"] += "megatron-core" in str(error)
            return
        assert trigger is None, f"{trigger} was planted but the config was accepted"
        load_hf_weights(model, TensorDict(dict(hf.state_dict())))
        tokens = 24 if spec.sliding_window > 8 else max(16, 4 * spec.sliding_window)  # >= 4 windows unless W > row
        row = random_row(packed_lengths(tokens, spec.sliding_window), spec.vocab_size, seed, pad_id=spec.pad_token_id)
        fwd, bwd = fp32_step(hf, copy.deepcopy(hf).double(), model, row, backward=True)
        measured = {k: v for k, v in {**fwd, **bwd}.items() if isinstance(v, (int, float))}
        failed = [r.describe() for r in evaluate(measured, fp32_gates(fwd, spec.moe is not None, backward=True))
                  if not r.passed]
        assert not failed, "; ".join(failed)
        stats["modelled"] += 1
        stats["moe"] += spec.moe is not None
        stats["floor_max"] = max(stats["floor_max"], fwd["hf_fp32_vs_fp64_max_abs_logprob"])
    return body


@pytest.mark.expected_seconds(112)
def test_config_search_is_modelled_exactly_or_refused(stage_report) -> None:
    """Hypothesis over tiny Gemma 4 configs: each is refused with one line naming the field, or passes one fp32
    parity step against transformers (the hf_parity gates); counts of both are in the report."""
    import time
    from collections import Counter

    from validation.properties import counted_property
    from validation.thresholds import DISCOVERY_PARITY_SEARCH

    stats: Counter = Counter(modelled=0, refused=0, hf_unbuildable=0, moe=0, floor_max=0.0)
    start = time.perf_counter()
    first = counted_property(search_configs(), parity_search_body(stats), stats, max_examples=150)
    by_field = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("refused:")}
    counts = {k: stats[k] for k in ("examples", "failures", "modelled", "refused")}
    stage_report.check("search/parity_or_refusal", {**counts, "refused_fields": len(by_field)},
                       DISCOVERY_PARITY_SEARCH, first_failures=first, moe_modelled=stats["moe"],
                       hf_unbuildable=stats["hf_unbuildable"], hf_fp32_vs_fp64_max=stats["floor_max"],
                       refusal_triggers=len(REFUSAL_TRIGGERS), refused_by_field=by_field,
                       refused_by_megatron_core=stats["refused_by_megatron_core"],
                       seconds=round(time.perf_counter() - start, 1))


def test_sensitivity_config_search_catches_a_window_off_by_one(stage_report) -> None:
    """The same search with Megatron's sliding windows one key too wide must fail some modelled example."""
    from collections import Counter

    from validation.properties import counted_property
    from validation.thresholds import DISCOVERY_PARITY_SEARCH

    def wider(spec: ModelSpec) -> ModelSpec:
        layers = tuple(dataclasses.replace(l, window=l.window + 1) if l.window else l for l in spec.layers)
        return dataclasses.replace(spec, layers=layers)

    stats: Counter = Counter(modelled=0, refused=0, hf_unbuildable=0, moe=0, floor_max=0.0)
    first = counted_property(search_configs(), parity_search_body(stats, wider), stats, max_examples=10)
    stage_report.expect_caught("sensitivity/search_window_off_by_one",
                               {k: stats[k] for k in ("examples", "failures", "modelled", "refused")},
                               DISCOVERY_PARITY_SEARCH[1:2], first_failures=first)
