"""The fixture factory and the project's tokenizer (plain tests, no stage): fixtures are deterministic, their
tensors come from the weight table and HF transformers loads them without missing keys and with informative
logits; the tokenizer round-trips any text and carries the Gemma 4 specials at their ids."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def moe_dir() -> Path:
    from fixtures.factory import fixture_dir

    return fixture_dir("moe")


@pytest.fixture(scope="module")
def hf_tokenizer(moe_dir):
    from fixtures.factory import hf_tokenizer

    return hf_tokenizer("moe")


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_regeneration_is_byte_identical(tmp_path):
    from fixtures.factory import fixture_dir, write_fixture

    for variant in ("moe", "dense"):
        a = _files(write_fixture(variant, tmp_path / f"{variant}-a", seed=0))
        b = _files(write_fixture(variant, tmp_path / f"{variant}-b", seed=0))
        assert a == b, f"{variant}: regeneration differs"
        assert _files(fixture_dir(variant)) == a, f"{variant}: cached copy differs from a fresh build"
        c = _files(write_fixture(variant, tmp_path / f"{variant}-c", seed=1))
        assert c["model.safetensors"] != a["model.safetensors"], "seed does not change the weights"
        assert {k: v for k, v in c.items() if k != "model.safetensors"} == {
            k: v for k, v in a.items() if k != "model.safetensors"}
    required = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja"}
    assert required <= set(a)


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_config_has_required_properties(variant):
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    from fixtures.factory import fixture_config, fixture_dir
    from fixtures.tokenizer import VOCAB_SIZE
    from gemma4_support.config.spec import load_spec
    from gemma4_support.convert.mapping import hf_inventory

    d = fixture_dir(variant)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg == fixture_config(variant)
    assert cfg["model_type"] == "gemma4_text" and cfg["architectures"] == ["Gemma4ForCausalLM"]
    assert cfg["num_hidden_layers"] == 6
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert cfg["sliding_window"] <= 16
    assert cfg["hidden_size_per_layer_input"] == 0 and cfg["num_kv_shared_layers"] == 0
    assert cfg["head_dim"] == 64 and cfg["global_head_dim"] == 128 and cfg["attention_k_eq_v"] is True
    assert cfg["final_logit_softcapping"] == 30.0 and cfg["vocab_size"] == VOCAB_SIZE
    assert cfg["enable_moe_block"] is (variant == "moe")
    if variant == "moe":
        assert cfg["num_experts"] >= 2 and 1 < cfg["top_k_experts"] < cfg["num_experts"]

    hf = AutoConfig.from_pretrained(d)
    assert hf.model_type == "gemma4_text"
    assert hf.per_layer_config[5].head_dim == 128
    assert hf.per_layer_config[5].num_key_value_heads == cfg["num_global_key_value_heads"]
    assert hf.per_layer_config[0].head_dim == 64

    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 2 and 1 in gen["eos_token_id"] and 106 in gen["eos_token_id"]

    w = load_file(str(d / "model.safetensors"))
    assert {k: tuple(t.shape) for k, t in w.items()} == hf_inventory(load_spec(cfg))  # the weight table's inventory
    assert all(t.dtype == np.float32 for t in w.values())
    assert "model.layers.5.self_attn.v_proj.weight" not in w  # K = V on the full layer
    assert "model.layers.0.self_attn.v_proj.weight" in w
    assert w["model.layers.5.self_attn.k_proj.weight"].shape == (cfg["num_global_key_value_heads"] * 128, 128)
    perturbed = [k for k in w if k.endswith(("norm.weight", "layer_scalar", "router.scale", "per_expert_scale"))]
    assert len(perturbed) >= 6 * 7
    for k in perturbed:
        assert not np.allclose(w[k], 1.0), f"{k} is all ones"
        assert np.all(np.isfinite(w[k]))
    if variant == "moe":
        assert w["model.layers.0.experts.gate_up_proj"].shape == (4, 128, 128)
        assert w["model.layers.0.experts.down_proj"].shape == (4, 128, 64)


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_hf_loads_without_missing_keys_and_logits_are_informative(variant):
    import torch
    from transformers import AutoModelForCausalLM

    from fixtures.factory import fixture_dir

    model, info = AutoModelForCausalLM.from_pretrained(fixture_dir(variant), dtype=torch.float32,
                                                       output_loading_info=True)
    assert type(model).__name__ == "Gemma4ForCausalLM"
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), f"{key}: {info.get(key)}"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (2, 40), generator=g)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert logits.abs().max() <= 30.0  # final softcap
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    # far from uniform (log 512 = 6.24) and far from one-hot
    assert 1.0 < entropy.mean().item() < 0.8 * math.log(model.config.vocab_size)
    assert logits.argmax(-1).unique().numel() > 10  # not one token everywhere
    target_lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert target_lp.std().item() > 0.5  # token log-probs vary meaningfully


# ---------------------------------------------------------------------------------------------
# tokenizer

TRICKY = [
    "",
    " ",
    "\n",
    "a\n\n\nb\r\n\t",
    "  leading and trailing  ",
    "naïve café, Zürich, 東京, Привет, مرحبا, 🙂👍🏽, e\u0301, \u200b, \ufeff",
    "\x00\x01\x7f",
    '{"key": "va<l>ue", "n": 3}',
    'call:f{x:<|"|>text<|"|>,n:3}',
    "<|turn>user\nhi<turn|>\n<bos><eos><pad>",
    "<|turn",
    "<turn|",
    "<unused7><unused200>",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 " * 20,
]


def test_tokenizer_round_trips_tricky_strings():
    from fixtures.tokenizer import VOCAB_SIZE, build_tokenizer

    tok = build_tokenizer()
    assert tok.get_vocab_size() == VOCAB_SIZE
    for text in TRICKY:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, repr(text)
        assert tok.encode(text, add_special_tokens=True).ids == ids  # the tokenizer never adds BOS/EOS
        assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert build_tokenizer().to_str() == tok.to_str()


def test_tokenizer_round_trips_any_text():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from fixtures.tokenizer import build_tokenizer

    tok = build_tokenizer()

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.text(max_size=200))
    def check(text):
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text

    check()


def test_special_tokens_are_single_ids_at_gemma_ids(hf_tokenizer):
    from fixtures.tokenizer import SPECIAL_TOKENS, build_tokenizer

    expected = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<|turn>": 105, "<turn|>": 106}
    for s, i in expected.items():
        assert SPECIAL_TOKENS[s] == i
    for s in ("<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
              "<|tool_response>", "<tool_response|>", '<|"|>'):
        assert 5 <= SPECIAL_TOKENS[s] <= 106
    assert len(set(SPECIAL_TOKENS.values())) == len(SPECIAL_TOKENS)
    tok = build_tokenizer()
    for s, i in SPECIAL_TOKENS.items():
        assert tok.token_to_id(s) == i
        assert tok.encode(f"x{s}y").ids.count(i) == 1
        assert tok.encode(s).ids == [i]
        assert hf_tokenizer.encode(s, add_special_tokens=False) == [i]
        assert hf_tokenizer.convert_ids_to_tokens(i) == s
    assert tok.encode("<unused60>").ids == [60]  # filler ids are single tokens too
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.bos_token_id,
            hf_tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert len(hf_tokenizer) == tok.get_vocab_size()
