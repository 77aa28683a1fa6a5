"""Stage tokenization, the fixtures' chat template on a hand-made conversation (system, thinking, parallel tool
calls with nested unicode arguments, string and dict tool responses, content parts): it renders the Gemma 4
format exactly, transformers' AutoTokenizer renders and tokenizes the same, its history is append-only (the
thought-stripping variant's is not), and vLLM's own Gemma 4 parsers read every model turn back."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.chat_template import CHAT_TEMPLATE, STRIP_THOUGHTS_TEMPLATE
from fixtures.conversations import CALL_ARGS_1, CALL_ARGS_2, weather_conversation, weather_tools
from fixtures.tokenizer import SPECIAL_TOKENS, encode
from gemma4_support.chat.template import render
from validation.vllm_parsers import parse_model_text

pytestmark = pytest.mark.stage_tokenization


@pytest.fixture(scope="module")
def hf_tokenizer():  # noqa: ANN201
    from fixtures.factory import hf_tokenizer

    return hf_tokenizer("moe")


def _render(messages: list[dict], tools: list[dict] | None = None, template: str = CHAT_TEMPLATE, **kwargs) -> str:  # noqa: ANN003
    """The library's renderer with the fixtures' template."""
    return render(messages, template=template, tools=tools, **kwargs)


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
    conv = weather_conversation()
    text = _render(conv, weather_tools(), enable_thinking=True)
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
    assert _render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == (
        "<bos><|turn>user\nhi<turn|>\n<|turn>model\n")
    assert _render([{"role": "user", "content": "hi"}], enable_thinking=True, add_generation_prompt=True) == (
        "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n")
    # the model turn stays open after tool calls / responses: no new generation prompt
    assert _render(conv[:4], weather_tools(), add_generation_prompt=True) == _render(conv[:4], weather_tools())


def test_autotokenizer_chat_template_equals_render(hf_tokenizer):
    assert hf_tokenizer.chat_template == CHAT_TEMPLATE
    conv = weather_conversation()
    for msgs, tools, think, gen in [
        (conv, weather_tools(), True, False),
        (conv, None, False, False),
        (conv[:2], weather_tools(), True, True),
        (conv[1:2], None, False, True),
        (conv[:5], weather_tools(), False, True),
    ]:
        want = _render(msgs, tools, add_generation_prompt=gen, enable_thinking=think)
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
    conv = weather_conversation()
    for tools, think in [(weather_tools(), True), (None, False)]:
        full = _render(conv, tools, enable_thinking=think)
        full_ids = encode(full)
        for k in range(len(conv)):
            plain = _render(conv[: k + 1], tools, enable_thinking=think)
            assert full.startswith(plain), k
            if k + 1 < len(conv) and conv[k + 1]["role"] == "assistant":
                prompt = _render(conv[: k + 1], tools, add_generation_prompt=True, enable_thinking=think)
                assert full.startswith(prompt), k
                ids = encode(prompt)  # the prefix also holds in token ids (turn boundaries are specials)
                assert full_ids[: len(ids)] == ids, k
    # the strip-thoughts variant drops earlier thoughts, so the history changes between turns
    prompt = _render(conv[:7], weather_tools(), add_generation_prompt=True, enable_thinking=True,
                    template=STRIP_THOUGHTS_TEMPLATE)
    earlier = _render(conv[:6], weather_tools(), enable_thinking=True, template=STRIP_THOUGHTS_TEMPLATE)
    assert "Need the tool." in earlier and "Need the tool." not in prompt
    assert not prompt.startswith(earlier)
    last = _render(conv, weather_tools(), enable_thinking=True, template=STRIP_THOUGHTS_TEMPLATE)
    assert "<|channel>thought\nPolite close." not in last  # before the last user message
    assert _render(conv[:8], weather_tools(), enable_thinking=True, template=STRIP_THOUGHTS_TEMPLATE).count("<|channel>") == 1


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


def _parse(tokenizer, output: str, tools):  # noqa: ANN001, ANN202
    return parse_model_text(tokenizer, output, thinking=True, tools=tools)


def test_vllm_gemma4_parsers_read_the_rendering_back(hf_tokenizer):
    from vllm.reasoning.gemma4_utils import parse_thinking_output

    conv = weather_conversation()
    text = _render(conv, weather_tools(), enable_thinking=True)

    reasoning, content, calls = _parse(hf_tokenizer, _model_turn(text, 0), weather_tools())
    assert reasoning == conv[2]["reasoning_content"]
    assert not content
    assert calls == [("get_weather", CALL_ARGS_1), ("get_weather", CALL_ARGS_2)]

    # continuation after the tool responses (the parser sees what the model generated there)
    after = text.split("<tool_response|>")[2].split("<turn|>")[0]
    reasoning, content, calls = _parse(hf_tokenizer, after, weather_tools())
    assert (reasoning, content, calls) == ("Both known.", "Zürich 12 C; 東京 20 C.", [])

    reasoning, content, calls = _parse(hf_tokenizer, _model_turn(text, 1), weather_tools())
    assert (reasoning, content, calls) == ("Polite close.", "You're welcome.\n", [])
    assert parse_thinking_output(_model_turn(text, 1) + "<turn|>") == {
        "thinking": "Polite close.", "answer": "You're welcome."}

    reasoning, content, calls = _parse(hf_tokenizer, _model_turn(text, 2), weather_tools())
    assert calls == [("noop", {})]


def test_vllm_tool_parser_reads_any_string_argument(hf_tokenizer):

    tools = [{"type": "function", "function": {"name": "echo", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}, "n": {"type": "integer"}}}}}]

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.text(max_size=40).filter(lambda s: not any(t[:2] in s or t[-2:] in s for t in SPECIAL_TOKENS)),
           st.integers(-10**6, 10**6))
    def check(text, n):
        conv = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "echo", "arguments": {"text": text, "n": n}}}]}]
        out = _model_turn(_render(conv, tools), 0)
        assert _parse(hf_tokenizer, out, tools)[2] == [("echo", {"text": text, "n": n})]

    check()
