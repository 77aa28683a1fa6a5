"""Stage tokenization, the fixtures' chat template against the published Gemma 4 format: one golden string per
construct (facts of the format: system turn, thinking flag, trimming, roles, tool declarations, tool calls and
responses, thoughts and which past ones are dropped, the generation prompts of both model families), the
hand-made conversation rendered whole, transformers' AutoTokenizer rendering and tokenizing the same, a
template error naming the message, and vLLM's own Gemma 4 parsers reading every model turn back."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.chat_template import CHAT_TEMPLATE, E2B_CHAT_TEMPLATE
from fixtures.conversations import CALL_ARGS_1, CALL_ARGS_2, weather_conversation, weather_tools
from fixtures.tokenizer import SPECIAL_TOKENS
from gemma4_support.chat.template import render, render_prompt
from gemma4_support.errors import TokenizationError
from validation.vllm_parsers import parse_model_text

pytestmark = pytest.mark.stage_tokenization

Q = '<|"|>'
USER = {"role": "user", "content": "hi"}
CALL = {"id": "c1", "type": "function", "function": {"name": "look", "arguments": {"b": 2, "A": "x", "a": [1, None]}}}
TOOL = {"type": "function", "function": {"name": "look", "description": "Looks.", "parameters": {
    "type": "object", "required": ["q"],
    "properties": {"q": {"type": "string", "description": "what"}, "k": {"type": "integer"},
                   "mode": {"type": "string", "enum": ["fast", "slow"]}, "tags": {"type": "array", "items": {"type": "string"}}}}}}
DECL = (f"<|tool>declaration:look{{description:{Q}Looks.{Q},parameters:{{properties:{{k:{{type:{Q}INTEGER{Q}}},"
        f"mode:{{enum:[{Q}fast{Q},{Q}slow{Q}],type:{Q}STRING{Q}}},q:{{description:{Q}what{Q},type:{Q}STRING{Q}}},"
        f"tags:{{items:{{type:{Q}STRING{Q}}},type:{Q}ARRAY{Q}}}}},required:[{Q}q{Q}],type:{Q}OBJECT{Q}}}}}<tool|>")

# (construct, messages, render options, the exact rendering)
GOLDEN = [
    ("no system turn without system, tools or thinking", [USER], {},
     "<bos><|turn>user\nhi<turn|>\n"),
    ("thinking flag opens the system turn, followed by a newline", [USER], {"enable_thinking": True},
     "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nhi<turn|>\n"),
    ("content trimmed (system, user, model)", [{"role": "system", "content": "  S  "}, {"role": "user", "content": " u \n"},
                                               {"role": "assistant", "content": "\n a "}], {},
     "<bos><|turn>system\nS<turn|>\n<|turn>user\nu<turn|>\n<|turn>model\na<turn|>\n"),
    ("a leading developer message is the system turn; a later one keeps its role",
     [{"role": "developer", "content": "D1"}, USER, {"role": "developer", "content": "D2"}], {},
     "<bos><|turn>system\nD1<turn|>\n<|turn>user\nhi<turn|>\n<|turn>developer\nD2<turn|>\n"),
    ("system content parts: each trimmed, then a space", [{"role": "system", "content": [
        {"type": "text", "text": " A "}, {"type": "text", "text": "B"}]}], {},
     "<bos><|turn>system\nA B <turn|>\n"),
    ("tool declarations: keys sorted, types upper-cased, strings quoted", [USER], {"tools": [TOOL]},
     f"<bos><|turn>system\n{DECL}<turn|>\n<|turn>user\nhi<turn|>\n"),
    ("tool-call arguments: keys sorted case-insensitively, unquoted; null", [USER, {"role": "assistant", "content": "",
                                                                             "tool_calls": [CALL]}], {},
     "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|tool_call>call:look{A:" + Q + "x" + Q
     + ",a:[1,null],b:2}<tool_call|><|tool_response>"),
    ("content and tool calls: the calls and their responses come before the content",
     [USER, {"role": "assistant", "content": "after", "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "c1", "content": "r"}], {},
     "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|tool_call>call:look{A:" + Q + "x" + Q + ",a:[1,null],b:2}"
     "<tool_call|><|tool_response>response:look{value:" + Q + "r" + Q + "}<tool_response|>after<turn|>\n"),
    ("tool response name: by call id first, then the message's name, else unknown",
     [USER, {"role": "assistant", "content": "", "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "c1", "name": "other", "content": "1"},
      {"role": "tool", "tool_call_id": "zz", "name": "other", "content": "2"},
      {"role": "tool", "content": "3"}], {},
     "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|tool_call>call:look{A:" + Q + "x" + Q + ",a:[1,null],b:2}"
     "<tool_call|><|tool_response>response:look{value:" + Q + "1" + Q + "}<tool_response|><|tool_response>"
     "response:other{value:" + Q + "2" + Q + "}<tool_response|><|tool_response>response:unknown{value:" + Q + "3"
     + Q + "}<tool_response|>"),
    ("a thought renders as a thought channel with newlines", [USER, {"role": "assistant", "reasoning": "r",
                                                                    "content": "a"}], {},
     "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\nr\n<channel|>a<turn|>\n"),
    ("past thoughts are dropped for model turns before the last user message",
     [USER, {"role": "assistant", "reasoning_content": "r1", "content": "a1"}, {"role": "user", "content": "u2"},
      {"role": "assistant", "reasoning": "r2", "content": "a2"}], {},
     "<bos><|turn>user\nhi<turn|>\n<|turn>model\na1<turn|>\n<|turn>user\nu2<turn|>\n<|turn>model\n<|channel>thought\n"
     "r2\n<channel|>a2<turn|>\n"),
    ("a model message's own thought channel is removed from its content",
     [USER, {"role": "assistant", "content": "x<|channel>thought\nhidden<channel|>y"}], {},
     "<bos><|turn>user\nhi<turn|>\n<|turn>model\nxy<turn|>\n"),
    ("26B-A4B / 31B generation prompt with thinking off: an empty thought", [USER], {"add_generation_prompt": True},
     "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"),
    ("generation prompt with thinking on", [USER], {"add_generation_prompt": True, "enable_thinking": True},
     "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n"),
    ("after a tool response with thinking on the open turn continues with a thought",
     [USER, {"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "c1",
                                                                          "content": "r"}],
     {"add_generation_prompt": True, "enable_thinking": True},
     "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n<|tool_call>call:look{A:" + Q + "x"
     + Q + ",a:[1,null],b:2}<tool_call|><|tool_response>response:look{value:" + Q + "r" + Q
     + "}<tool_response|><|channel>thought\n"),
]


@pytest.mark.parametrize("construct, messages, options, expected", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_construct(construct: str, messages: list, options: dict, expected: str) -> None:
    """The fixtures' template renders each construct of the published format exactly."""
    assert render(messages, template=CHAT_TEMPLATE, **options) == expected


def test_e2b_family_generation_prompt_has_no_empty_thought() -> None:
    assert render([USER], template=E2B_CHAT_TEMPLATE, add_generation_prompt=True) == (
        "<bos><|turn>user\nhi<turn|>\n<|turn>model\n")
    assert render([USER], template=CHAT_TEMPLATE, add_generation_prompt=True).endswith(
        "<|turn>model\n<|channel>thought\n<channel|>")


def test_json_string_arguments_raise_in_the_template_and_decode_on_vllms_path() -> None:
    """The template refuses arguments given as a JSON string; vLLM's request path decodes them first."""
    as_text = {**CALL, "function": {"name": "look", "arguments": '{"b": 2}'}}
    messages = [USER, {"role": "assistant", "content": "", "tool_calls": [as_text]}]
    with pytest.raises(Exception, match="must be a JSON object"):
        render(messages, template=CHAT_TEMPLATE)
    assert "call:look{b:2}" in render_prompt(messages, template=CHAT_TEMPLATE)
    with pytest.raises(TokenizationError, match=r"message 1 \(assistant\) tool call 0 arguments are a JSON list"):
        render_prompt([USER, {"role": "assistant", "tool_calls": [
            {**CALL, "function": {"name": "look", "arguments": "[1]"}}]}], template=CHAT_TEMPLATE)


def test_weather_conversation_renders_whole(hf_tokenizer) -> None:
    """The hand-made conversation: thinking on, two parallel calls, responses, parts, a later noop call."""
    text = render(weather_conversation(), template=CHAT_TEMPLATE, tools=weather_tools(), enable_thinking=True)
    assert text.startswith("<bos><|turn>system\n<|think|>\nYou are terse.<|tool>declaration:get_weather{")
    assert ("<|turn>model\n<|tool_call>call:get_weather{city:" + Q + 'Zürich, "old town"' + Q + ",days:3,metric:true,"
            "opts:{hours:[6,12,18],unit:" + Q + "celsius" + Q + "},ratio:2.5,tags:[") in text
    assert text.endswith("<|turn>user\nThanks!Bye.<turn|>\n<|turn>model\nYou're welcome.<turn|>\n"
                         "<|turn>user\nOne more: call noop.<turn|>\n<|turn>model\n<|tool_call>call:noop{}<tool_call|>"
                         "<|tool_response>response:noop{value:" + Q + Q + "}<tool_response|>Done.<turn|>\n")
    assert "Need the tool." not in text and "Polite close." not in text  # both before a later user message


@pytest.fixture(scope="module")
def hf_tokenizer():  # noqa: ANN201
    from fixtures.factory import hf_tokenizer

    return hf_tokenizer("moe")


def test_autotokenizer_chat_template_equals_render(hf_tokenizer) -> None:
    """transformers renders and tokenizes the fixture's template exactly as the library renders it."""
    assert hf_tokenizer.chat_template == CHAT_TEMPLATE
    conv = weather_conversation()
    for msgs, tools, think, gen in [(conv, weather_tools(), True, False), (conv, None, False, False),
                                    (conv[:2], weather_tools(), True, True), (conv[1:2], None, False, True),
                                    (conv[:5], weather_tools(), False, True)]:
        want = render(msgs, template=CHAT_TEMPLATE, tools=tools, add_generation_prompt=gen, enable_thinking=think)
        got = hf_tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, enable_thinking=think,
                                               tokenize=False)
        assert got == want
        ids = hf_tokenizer.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, enable_thinking=think,
                                               tokenize=True, return_dict=False)
        assert list(ids) == hf_tokenizer.encode(want, add_special_tokens=False)
        assert list(ids) == hf_tokenizer.encode(want, add_special_tokens=True)  # BOS only from the template
        assert ids[0] == 2 and list(ids).count(2) == 1
        assert hf_tokenizer.decode(ids, skip_special_tokens=False) == want


def test_template_error_names_the_message() -> None:
    conv = [USER, {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": {"temp": 20}}]
    with pytest.raises(TokenizationError, match=r"message 2 \(tool\) content is a dict"):
        render_prompt(conv, template=CHAT_TEMPLATE)


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


def test_vllm_gemma4_parsers_read_the_rendering_back(hf_tokenizer) -> None:
    from vllm.reasoning.gemma4_utils import parse_thinking_output

    conv = weather_conversation()
    # the last exchange with a thought: render up to it (thoughts survive after the last user message)
    text = render(conv[:6], template=CHAT_TEMPLATE, tools=weather_tools(), enable_thinking=True)
    reasoning, content, calls = parse_model_text(hf_tokenizer, _model_turn(text, 0), tools=weather_tools())
    assert reasoning == conv[2]["reasoning_content"] and not content
    assert calls == [("get_weather", CALL_ARGS_1), ("get_weather", CALL_ARGS_2)]
    after = text.split("<tool_response|>")[2].split("<turn|>")[0]  # what the model generated after the responses
    assert parse_model_text(hf_tokenizer, after, tools=weather_tools()) == ("Both known.", "Zürich 12 C; 東京 20 C.", [])
    last = render(conv[:8], template=CHAT_TEMPLATE, tools=weather_tools(), enable_thinking=True)
    assert parse_model_text(hf_tokenizer, _model_turn(last, 1), tools=weather_tools()) == (
        "Polite close.", "You're welcome.", [])
    assert parse_thinking_output(_model_turn(last, 1) + "<turn|>") == {"thinking": "Polite close.",
                                                                       "answer": "You're welcome."}
    full = render(conv, template=CHAT_TEMPLATE, tools=weather_tools(), enable_thinking=True)
    assert parse_model_text(hf_tokenizer, _model_turn(full, 2), tools=weather_tools())[2] == [("noop", {})]


def test_vllm_tool_parser_reads_any_string_argument(hf_tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "echo", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}, "n": {"type": "integer"}}}}}]

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.text(max_size=40).filter(lambda s: not any(t[:2] in s or t[-2:] in s for t in SPECIAL_TOKENS)),
           st.integers(-10**6, 10**6))
    def check(text, n):
        conv = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "echo", "arguments": {"text": text, "n": n}}}]}]
        out = _model_turn(render(conv, template=CHAT_TEMPLATE, tools=tools), 0)
        assert parse_model_text(hf_tokenizer, out, tools=tools)[2] == [("echo", {"text": text, "n": n})]

    check()
