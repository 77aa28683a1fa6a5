"""The fixture factory, the project's tokenizer and the Gemma 4 chat template.

Plain tests (no stage): fixtures are deterministic and loadable by HF transformers, the tokenizer
round-trips any text and carries the Gemma 4 specials at their ids, the template renders the Gemma 4
format, is append-only, and vLLM's own Gemma 4 parsers read it back. The ``slow`` test serves the MoE
fixture with a real vLLM engine and compares its sampled-token log-probs with HF transformers.

Run as a script (``python validation/test_fixtures.py MODEL_DIR IN_JSON OUT_JSON``) it is the vLLM probe
the slow test starts in a subprocess (``vllm.LLM`` spawns processes, hence the ``__main__`` guard).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# conversations used below


def _tools() -> list[dict]:
    return [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city.\nReturns {temp, sky}.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "days": {"type": "integer"},
                        "metric": {"type": "boolean"},
                        "ratio": {"type": "number"},
                        "opts": {
                            "type": "object",
                            "properties": {"unit": {"type": "string"}, "hours": {"type": "array", "items": {"type": "integer"}}},
                        },
                        "tags": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["city"],
                },
            },
        },
        {"type": "function", "function": {"name": "noop", "description": "Does nothing.",
                                          "parameters": {"type": "object", "properties": {}}}},
    ]


CALL_ARGS_1 = {
    "city": "Zürich, \"old town\"",
    "days": 3,
    "metric": True,
    "ratio": 2.5,
    "opts": {"unit": "celsius", "hours": [6, 12, 18]},
    "tags": ["a,b", "line1\nline2", "{braces}", "東京 🙂", ""],
}
CALL_ARGS_2 = {"city": "東京", "days": 1}


def _conversation() -> list[dict]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Zürich?\nAnd 東京."},
        {
            "role": "assistant",
            "reasoning_content": "Need the tool.\nTwo cities: call twice.",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS_1}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS_2}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12 C, rain"},
        {"role": "tool", "tool_call_id": "c2", "content": {"temp": 20, "sky": "clear"}},
        {"role": "assistant", "reasoning_content": "Both known.", "content": "Zürich 12 C; 東京 20 C."},
        {"role": "user", "content": [{"type": "text", "text": "Thanks! "}, {"type": "text", "text": "Bye."}]},
        {"role": "assistant", "reasoning": "Polite close.", "content": "You're welcome.\n"},
        {"role": "user", "content": "One more: call noop."},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c3", "type": "function", "function": {"name": "noop", "arguments": {}}}]},
        {"role": "tool", "name": "noop", "content": ""},
        {"role": "assistant", "content": "Done."},
    ]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def moe_dir() -> Path:
    from fixtures.factory import fixture_dir

    return fixture_dir("moe")


@pytest.fixture(scope="module")
def hf_tokenizer(moe_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(moe_dir)


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
    from gemma4_support.chat.tokenizer import VOCAB_SIZE

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
    from gemma4_support.chat.tokenizer import VOCAB_SIZE, build_tokenizer

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

    from gemma4_support.chat.tokenizer import build_tokenizer

    tok = build_tokenizer()

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.text(max_size=200))
    def check(text):
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text

    check()


def test_special_tokens_are_single_ids_at_gemma_ids(hf_tokenizer):
    from gemma4_support.chat.tokenizer import SPECIAL_TOKENS, build_tokenizer

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


# ---------------------------------------------------------------------------------------------
# chat template


def _expected_first_turns() -> str:
    return (
        "<bos><|turn>system\n<|think|>You are terse."
        "<|tool>declaration:get_weather{description:<|\"|>Weather for a city.\nReturns {temp, sky}.<|\"|>,"
        "parameters:{type:<|\"|>object<|\"|>,properties:{city:{type:<|\"|>string<|\"|>},"
        "days:{type:<|\"|>integer<|\"|>},metric:{type:<|\"|>boolean<|\"|>},ratio:{type:<|\"|>number<|\"|>},"
        "opts:{type:<|\"|>object<|\"|>,properties:{unit:{type:<|\"|>string<|\"|>},hours:{type:<|\"|>array<|\"|>,"
        "items:{type:<|\"|>integer<|\"|>}}}},tags:{type:<|\"|>array<|\"|>,items:{type:<|\"|>string<|\"|>}}},"
        "required:[<|\"|>city<|\"|>]}}<tool|>"
        "<|tool>declaration:noop{description:<|\"|>Does nothing.<|\"|>,parameters:{type:<|\"|>object<|\"|>,"
        "properties:{}}}<tool|><turn|>\n"
        "<|turn>user\nWeather in Zürich?\nAnd 東京.<turn|>\n"
        "<|turn>model\n<|channel>thought\nNeed the tool.\nTwo cities: call twice.<channel|>"
        "<|tool_call>call:get_weather{city:<|\"|>Zürich, \"old town\"<|\"|>,days:3,metric:true,ratio:2.5,"
        "opts:{unit:<|\"|>celsius<|\"|>,hours:[6,12,18]},tags:[<|\"|>a,b<|\"|>,<|\"|>line1\nline2<|\"|>,"
        "<|\"|>{braces}<|\"|>,<|\"|>東京 🙂<|\"|>,<|\"|><|\"|>]}<tool_call|>"
        "<|tool_call>call:get_weather{city:<|\"|>東京<|\"|>,days:1}<tool_call|>"
        "<|tool_response>response:get_weather{value:<|\"|>12 C, rain<|\"|>}<tool_response|>"
        "<|tool_response>response:get_weather{temp:20,sky:<|\"|>clear<|\"|>}<tool_response|>"
        "<|channel>thought\nBoth known.<channel|>Zürich 12 C; 東京 20 C.<turn|>\n"
    )


def test_template_renders_the_gemma4_format():
    from gemma4_support.chat.template import render

    conv = _conversation()
    text = render(conv, _tools(), enable_thinking=True)
    assert text.startswith(_expected_first_turns())
    assert text.endswith(
        "<|turn>user\nThanks! Bye.<turn|>\n"
        "<|turn>model\n<|channel>thought\nPolite close.<channel|>You're welcome.\n<turn|>\n"
        "<|turn>user\nOne more: call noop.<turn|>\n"
        "<|turn>model\n<|tool_call>call:noop{}<tool_call|><|tool_response>response:noop{value:<|\"|><|\"|>}"
        "<tool_response|>Done.<turn|>\n"
    )
    assert text.count("<bos>") == 1
    # no system turn without system message / tools / thinking; generation prompt
    assert render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == (
        "<bos><|turn>user\nhi<turn|>\n<|turn>model\n")
    assert render([{"role": "user", "content": "hi"}], enable_thinking=True, add_generation_prompt=True) == (
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n")
    # the model turn stays open after tool calls / responses: no new generation prompt
    assert render(conv[:4], _tools(), add_generation_prompt=True) == render(conv[:4], _tools())


def test_autotokenizer_chat_template_equals_render(hf_tokenizer):
    from gemma4_support.chat.template import CHAT_TEMPLATE, render

    assert hf_tokenizer.chat_template == CHAT_TEMPLATE
    conv = _conversation()
    for msgs, tools, think, gen in [
        (conv, _tools(), True, False),
        (conv, None, False, False),
        (conv[:2], _tools(), True, True),
        (conv[1:2], None, False, True),
        (conv[:5], _tools(), False, True),
    ]:
        want = render(msgs, tools, add_generation_prompt=gen, enable_thinking=think)
        got = hf_tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen,
                                               enable_thinking=think, tokenize=False)
        assert got == want
        ids = hf_tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen,
                                               enable_thinking=think, tokenize=True, return_dict=False)
        assert list(ids) == hf_tokenizer.encode(want, add_special_tokens=False)
        assert list(ids) == hf_tokenizer.encode(want, add_special_tokens=True)  # BOS only from the template
        assert ids[0] == 2 and list(ids).count(2) == 1
        assert hf_tokenizer.decode(ids, skip_special_tokens=False) == want


def test_template_history_is_append_only():
    from gemma4_support.chat.template import STRIP_THOUGHTS_TEMPLATE, render
    from gemma4_support.chat.tokenizer import build_tokenizer

    tok = build_tokenizer()
    conv = _conversation()
    for tools, think in [(_tools(), True), (None, False)]:
        full = render(conv, tools, enable_thinking=think)
        full_ids = tok.encode(full).ids
        for k in range(len(conv)):
            plain = render(conv[: k + 1], tools, enable_thinking=think)
            assert full.startswith(plain), k
            if k + 1 < len(conv) and conv[k + 1]["role"] == "assistant":
                prompt = render(conv[: k + 1], tools, add_generation_prompt=True, enable_thinking=think)
                assert full.startswith(prompt), k
                ids = tok.encode(prompt).ids  # the prefix also holds in token ids (turn boundaries are specials)
                assert full_ids[: len(ids)] == ids, k
    # the strip-thoughts variant drops earlier thoughts, so the history changes between turns
    prompt = render(conv[:7], _tools(), add_generation_prompt=True, enable_thinking=True,
                    template=STRIP_THOUGHTS_TEMPLATE)
    earlier = render(conv[:6], _tools(), enable_thinking=True, template=STRIP_THOUGHTS_TEMPLATE)
    assert "Need the tool." in earlier and "Need the tool." not in prompt
    assert not prompt.startswith(earlier)
    last = render(conv, _tools(), enable_thinking=True, template=STRIP_THOUGHTS_TEMPLATE)
    assert "<|channel>thought\nPolite close." not in last  # before the last user message
    assert render(conv[:8], _tools(), enable_thinking=True, template=STRIP_THOUGHTS_TEMPLATE).count("<|channel>") == 1


# ---------------------------------------------------------------------------------------------
# vLLM's Gemma 4 parsers read the rendering back


def _model_turn(text: str, nth: int) -> str:
    """The text the model generated in its ``nth`` turn (after ``<|turn>model\\n``, up to its end or the
    first tool response)."""
    start = 0
    for _ in range(nth + 1):
        start = text.index("<|turn>model\n", start) + len("<|turn>model\n")
    end = min([i for i in (text.find("<|tool_response>", start), text.find("<turn|>", start)) if i >= 0] + [len(text)])
    return text[start:end]


def _vllm_parsers():
    """vLLM's Gemma 4 parser classes. Importing vllm imports torch._inductor, whose module-level
    ``torch.jit.script_method`` raises a DeprecationWarning (torch 2.13): silenced for the import only,
    so the suite still runs under ``-W error``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.reasoning.gemma4_engine_reasoning_parser import Gemma4ParserReasoningAdapter
        from vllm.reasoning.gemma4_utils import parse_thinking_output
        from vllm.tool_parsers.gemma4_engine_tool_parser import Gemma4EngineToolParser
    return ChatCompletionRequest, Gemma4ParserReasoningAdapter, Gemma4EngineToolParser, parse_thinking_output


def _request(tools):
    ChatCompletionRequest = _vllm_parsers()[0]

    return ChatCompletionRequest(model="fixture", messages=[{"role": "user", "content": "x"}], tools=tools,
                                 chat_template_kwargs={"enable_thinking": True})


def _parse(hf_tokenizer, output: str, tools):
    _, Gemma4ParserReasoningAdapter, Gemma4EngineToolParser, _ = _vllm_parsers()

    req = _request(tools)
    reasoning, content = Gemma4ParserReasoningAdapter(hf_tokenizer).extract_reasoning(output, req)
    info = Gemma4EngineToolParser(hf_tokenizer, req.tools).extract_tool_calls(content or "", req)
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls]
    return reasoning, (info.content if info.tools_called else content), calls


def test_vllm_gemma4_parsers_read_the_rendering_back(hf_tokenizer):
    from gemma4_support.chat.template import render

    parse_thinking_output = _vllm_parsers()[3]

    conv = _conversation()
    text = render(conv, _tools(), enable_thinking=True)

    reasoning, content, calls = _parse(hf_tokenizer, _model_turn(text, 0), _tools())
    assert reasoning == conv[2]["reasoning_content"]
    assert not content
    assert calls == [("get_weather", CALL_ARGS_1), ("get_weather", CALL_ARGS_2)]

    # continuation after the tool responses (the parser sees what the model generated there)
    after = text.split("<tool_response|>")[2].split("<turn|>")[0]
    reasoning, content, calls = _parse(hf_tokenizer, after, _tools())
    assert (reasoning, content, calls) == ("Both known.", "Zürich 12 C; 東京 20 C.", [])

    reasoning, content, calls = _parse(hf_tokenizer, _model_turn(text, 1), _tools())
    assert (reasoning, content, calls) == ("Polite close.", "You're welcome.\n", [])
    assert parse_thinking_output(_model_turn(text, 1) + "<turn|>") == {
        "thinking": "Polite close.", "answer": "You're welcome."}

    reasoning, content, calls = _parse(hf_tokenizer, _model_turn(text, 2), _tools())
    assert calls == [("noop", {})]


def test_vllm_tool_parser_reads_any_string_argument(hf_tokenizer):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gemma4_support.chat.template import render
    from gemma4_support.chat.tokenizer import SPECIAL_TOKENS

    tools = [{"type": "function", "function": {"name": "echo", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}, "n": {"type": "integer"}}}}}]

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.text(max_size=40).filter(lambda s: not any(t[:2] in s or t[-2:] in s for t in SPECIAL_TOKENS)),
           st.integers(-10**6, 10**6))
    def check(text, n):
        conv = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "echo", "arguments": {"text": text, "n": n}}}]}]
        out = _model_turn(render(conv, tools), 0)
        assert _parse(hf_tokenizer, out, tools)[2] == [("echo", {"text": text, "n": n})]

    check()


# ---------------------------------------------------------------------------------------------
# a real vLLM engine serves the MoE fixture


def _probe_prompts() -> list[dict]:
    from gemma4_support.chat.template import render
    from gemma4_support.chat.tokenizer import build_tokenizer

    tok = build_tokenizer()
    conv = [{"role": "user", "content": "Tell me about the weather in Paris today, please. And tomorrow?"}]
    chat_ids = tok.encode(render(conv, add_generation_prompt=True)).ids
    return [{"messages": conv, "ids": chat_ids}, {"ids": [2] + list(range(110, 150))}]


def _vllm_probe(model_dir: str, in_json: str, out_json: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(in_json).read_text())
    t0 = time.time()
    llm = LLM(model=model_dir, dtype="float32", gpu_memory_utilization=0.2, max_model_len=256, seed=0,
              enforce_eager=True)
    t1 = time.time()
    sp = SamplingParams(max_tokens=8, temperature=1.0, logprobs=0, seed=1234, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p["ids"]) for p in prompts], sp, use_tqdm=False)
    chat = llm.chat([p["messages"] for p in prompts if "messages" in p], sp, use_tqdm=False)
    rows = []
    for out in outs:
        o = out.outputs[0]
        rows.append({"ids": list(o.token_ids), "logprobs": [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]})
    result = {"rows": rows, "chat_prompt_ids": [list(c.prompt_token_ids) for c in chat],
              "engine_start_s": t1 - t0, "generate_s": time.time() - t1}
    Path(out_json).write_text(json.dumps(result))


@pytest.mark.slow
def test_vllm_serves_moe_fixture_with_hf_logprobs(moe_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    prompts = _probe_prompts()
    (tmp_path / "in.json").write_text(json.dumps(prompts))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(REPO))
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, str(moe_dir), str(tmp_path / "in.json"), str(tmp_path / "out.json")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "out.json").read_text())
    # vLLM's chat prompt ids == template render + encode (BOS from the template only)
    assert result["chat_prompt_ids"] == [prompts[0]["ids"]]

    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    worst = 0.0
    for prompt, row in zip(prompts, result["rows"]):
        assert len(row["ids"]) == 8
        ids = torch.tensor([prompt["ids"] + row["ids"]])
        with torch.no_grad():
            logp = model(ids).logits.float().log_softmax(-1)[0]
        n = len(prompt["ids"])
        hf = [logp[n - 1 + i, t].item() for i, t in enumerate(row["ids"])]
        worst = max(worst, max(abs(a - b) for a, b in zip(hf, row["logprobs"])))
    assert worst <= 1e-4, f"vLLM vs HF sampled-token logprob max abs diff {worst:.2e}"
    assert len(prompts[0]["ids"]) > 2 * 8  # longer than two sliding windows
    print(f"vLLM engine start {result['engine_start_s']:.1f}s, total {time.time() - t0:.1f}s, max|Δlogprob| {worst:.1e}")


if __name__ == "__main__":
    _vllm_probe(*sys.argv[1:4])
