"""Stage hf_parity across Gemma 4 config variants: checkpoints written by transformers itself (`save_pretrained` of a
randomly initialised tiny Gemma4ForCausalLM: hidden 64, head_dim 64 unless the case varies it) for the routing
setups, layer patterns, windows, head widths and bf16 storage the fixtures do not cover. Each passes the fp32 forward
gates (log-probs relative to HF's own fp32-vs-fp64 distance, KL, routing) and backward gates on a packed row of three
documents at least 4 windows long (window 4096: a 64-token row, shorter than one window, so the sliding layers
see whole documents — the case checks that a window beyond the row changes nothing).
Configs the library does not model are refused before anything is built, with one line naming the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures.configs import TINY_MOE, tiny_text_config
from gemma4_support.config.spec import FULL, SLIDING, load_spec
from gemma4_support.errors import ConfigError, UnsupportedVariantError
from gemma4_support.model import config as model_config
from gemma4_support.model.build import build_model
from validation.hf_checkpoints import Subject, hf_model, megatron_model, save_random_checkpoint
from validation.parity import fp32_gates, fp32_step
from validation.thresholds import HF_PARITY_BACKWARD_FP32, HF_PARITY_BACKWARD_FP32_UNRESOLVED

pytestmark = pytest.mark.stage_hf_parity

S, F = SLIDING, FULL


def moe(experts: int = 4, top_k: int = 2) -> dict:
    """MoE fields: `experts` routed experts, `top_k` per token."""
    return {**TINY_MOE, "num_experts": experts, "top_k_experts": top_k}


# case -> (text config overrides, row length or None for max(64, 4 windows))
CASES = {
    "top_k_1": (moe(top_k=1), None),
    "top_k_2": (moe(top_k=2), None),
    "top_k_8_of_16": (moe(experts=16, top_k=8), None),
    "single_expert": (moe(experts=1, top_k=1), None),
    "dense_without_k_eq_v": ({"attention_k_eq_v": False}, None),
    "pattern_irregular": ({"num_hidden_layers": 5, "layer_types": [F, S, S, F, F], **moe()}, None),
    "pattern_all_full": ({"num_hidden_layers": 2, "layer_types": [F, F]}, None),
    "pattern_trailing_sliding": ({"num_hidden_layers": 4, "layer_types": [S, F, S, S]}, None),
    "window_3": ({"sliding_window": 3}, None),
    "window_4096": ({"sliding_window": 4096, "max_position_embeddings": 4096}, 64),
    "head_widths_k_eq_v": ({"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "global_head_dim": 64,
                            "num_global_key_value_heads": 2}, None),
    "global_kv_ignored_without_k_eq_v": ({"num_attention_heads": 4, "attention_k_eq_v": False,
                                          "num_global_key_value_heads": 4, "global_head_dim": 32}, None),
    "no_softcap_untied": ({"final_logit_softcapping": None, "tie_word_embeddings": False, **moe()}, None),
    "rope_theta_partial_factor": ({"rope_parameters": {
        S: {"rope_type": "default", "rope_theta": 50_000.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 100_000.0, "factor": 2.0}}}, None),
    "activation_silu_eps": ({"hidden_activation": "silu", "rms_norm_eps": 1e-3}, None),
    "stored_bf16": (moe(), None),
}
# save_pretrained options of a case: a checkpoint stored in bf16 (as a bf16 run saves it), run in fp32 by both sides
SAVE_OPTIONS = {"stored_bf16": {"dtype": torch.bfloat16}}


def _trailing_sliding(path: Path) -> None:
    """transformers forces the last layer to full when it saves: write the config back with the last layer sliding,
    as a hand-edited config.json has it (transformers forces it again on load; the spec must do the same)."""
    config = json.loads((path / "config.json").read_text())
    config["layer_types"][-1] = S
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case", list(CASES))
def test_config_variant_parity(case: str, tmp_path: Path, stage_report, gemma4_seed: int) -> None:
    """One training step on a transformers-written checkpoint of the variant: fp32 forward and backward gates."""
    overrides, tokens = CASES[case]
    save_random_checkpoint(tmp_path, tiny_text_config(**overrides), gemma4_seed, **SAVE_OPTIONS.get(case, {}))
    if case == "pattern_trailing_sliding":
        _trailing_sliding(tmp_path)
    subject = Subject(tmp_path, None, load_spec(tmp_path), tokens)
    if case == "pattern_trailing_sliding":
        assert subject.spec.layer_types[-1] == F and subject.spec.notes
    row = subject.row("packed", gemma4_seed)
    fwd, bwd = fp32_step(hf_model(tmp_path, None), hf_model(tmp_path, None, torch.float64), megatron_model(subject),
                         row, backward=True)
    info = {**subject.info(row), "overrides": overrides}
    stage_report.check(f"variant/{case}/forward_fp32", fwd, fp32_gates(fwd, subject.spec.moe is not None), **info)
    per_tensor = bwd.pop("per_tensor_rel_l2")
    stage_report.check(f"variant/{case}/backward_fp32", bwd, HF_PARITY_BACKWARD_FP32 + HF_PARITY_BACKWARD_FP32_UNRESOLVED,
                       tensors_compared=len(per_tensor), **info)


# Variants transformers builds and saves but the library does not model: refused with one line naming the field.
REFUSED = {
    "attention_bias": ({"attention_bias": True}, UnsupportedVariantError),
    "attention_dropout": ({"attention_dropout": 0.1}, UnsupportedVariantError),
    "hidden_activation": ({"hidden_activation": "gelu_new"}, UnsupportedVariantError),
    "hidden_size_per_layer_input": ({"hidden_size_per_layer_input": 16}, UnsupportedVariantError),
    "rope_type": ({"rope_parameters": {S: {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
                                       F: {"rope_type": "proportional", "rope_theta": 1e6}}}, UnsupportedVariantError),
}


@pytest.mark.parametrize("field", list(REFUSED))
def test_unsupported_variant_is_refused_in_one_line(field: str, tmp_path: Path, stage_report, gemma4_seed: int) -> None:
    """A transformers-written checkpoint of an unmodelled variant: load_spec refuses it naming the field and the fix."""
    overrides, error = REFUSED[field]
    save_random_checkpoint(tmp_path, tiny_text_config(**overrides), gemma4_seed)
    with pytest.raises(error) as info:
        load_spec(tmp_path)
    message = str(info.value)
    assert field in message and "fix:" in message and "\n" not in message
    stage_report.record(f"refused/{field}", message=message)


def test_megatron_validation_errors_become_one_config_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """megatron-core's own TransformerConfig validation error (here: top-1 routing without its pre-softmax flag, the
    failure a transformers-written top-1 checkpoint hit) surfaces as one ConfigError line naming the HF field."""
    spec = load_spec(tiny_text_config(**moe(top_k=1)))
    build_model(spec)  # the library's own config builds: Gemma 4's router is pre-softmax by construction
    real = model_config.TransformerConfig

    def without_pre_softmax(**kwargs):
        return real(**{**kwargs, "moe_router_pre_softmax": False})

    monkeypatch.setattr(model_config, "TransformerConfig", without_pre_softmax)
    with pytest.raises(ConfigError) as info:
        build_model(spec)
    message = str(info.value)
    assert "top_k_experts" in message and "megatron-core" in message and "fix:" in message and "\n" not in message
