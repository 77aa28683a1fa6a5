"""Stage tokenization, the chat format over generated conversations (hypothesis: system/user/model turns,
thinking on/off, tool calls with nested unicode arguments, tool responses, empty contents): render -> tokenize
-> decode is the rendered text; the fixture's shipped template renders the same text through transformers;
the text parses back to the same messages with vLLM's own Gemma 4 reasoning and tool-call parsers; rendering
``conversation[:k+1]`` is a token prefix of the full rendering wherever the format promises it."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from fixtures.chat_template import CHAT_TEMPLATE, STRIP_THOUGHTS_TEMPLATE
from fixtures.conversations import conversations
from fixtures.factory import hf_tokenizer
from fixtures.tokenizer import decode, encode
from gemma4_support.chat.template import render
from gemma4_support.serving.wire import template_messages
from validation import thresholds as T
from validation.properties import counted_property
from validation.vllm_parsers import parse_model_text

pytestmark = pytest.mark.stage_tokenization


def _render_conv(conv: dict, messages=None, add_generation_prompt: bool = False, template: str = CHAT_TEMPLATE) -> str:  # noqa: ANN001
    return render(template_messages(conv["messages"] if messages is None else messages), tools=conv["tools"],
                  add_generation_prompt=add_generation_prompt, enable_thinking=conv["enable_thinking"],
                  template=template)


# ---------------------------------------------------------------- parse back with vLLM's parsers ----

def _scalar_text(v) -> str:
    """How the Gemma 4 format writes a non-string scalar (vLLM's argument parser returns it as this text)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return str(v)


def _normal_value(v):
    if isinstance(v, dict):
        return {k: _normal_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_normal_value(x) for x in v]
    return v if isinstance(v, str) else _scalar_text(v)


def _expected_messages(conv: dict) -> list[dict]:
    """The conversation as it must parse back, in vLLM's normal form (see `_parse_rendered`)."""
    msgs = template_messages(conv["messages"])
    out: list[dict] = []
    if (conv["enable_thinking"] or conv["tools"]) and msgs[0]["role"] != "system":
        out.append({"role": "system", "content": ""})  # the system turn that carries <|think|> / declarations
    calls_by_id: dict[str, str] = {}
    for m in msgs:
        role = m["role"]
        if role in ("system", "user"):
            out.append({"role": role, "content": m["content"] or ""})
        elif role == "assistant":
            calls = [{"name": c["function"]["name"], "arguments": _normal_value(c["function"]["arguments"])}
                     for c in m.get("tool_calls") or []]
            for c in m.get("tool_calls") or []:
                calls_by_id[c["id"]] = c["function"]["name"]
            out.append({"role": "assistant", "reasoning": (m.get("reasoning_content") or "").strip(),
                        "content": (m.get("content") or "").strip(), "tool_calls": calls})
        elif role == "tool":
            content = m["content"]
            body = _normal_value(content) if isinstance(content, dict) else {"value": content}
            out.append({"role": "tool", "name": calls_by_id[m["tool_call_id"]], "content": body})
    return _drop_ambiguous_empties(out)


def _drop_ambiguous_empties(msgs: list[dict]) -> list[dict]:
    """An empty assistant message right after a tool response renders nothing: the format cannot show it."""
    out = []
    for i, m in enumerate(msgs):
        empty = m["role"] == "assistant" and not m["content"] and not m["reasoning"] and not m["tool_calls"]
        if empty and i > 0 and msgs[i - 1]["role"] == "tool":
            continue
        out.append(m)
    return out


def _vllm_parse_model_text(text: str, thinking: bool) -> tuple[str, str, list[dict]]:
    """vLLM's Gemma 4 reasoning parser, then its tool-call parser, on one model message's text (stripped)."""
    reasoning, body, calls = parse_model_text(hf_tokenizer(), text, thinking=thinking)
    return (reasoning or "").strip(), (body or "").strip(), [{"name": n, "arguments": a} for n, a in calls]


_TURN = re.compile(r"<\|turn>(system|user|model)\n")
_RESPONSE = re.compile(r"<\|tool_response>(.*?)<tool_response\|>", re.S)
_DECL = re.compile(r"<\|tool>declaration:(\w+)\{.*?\}<tool\|>", re.S)


def _parse_rendered(text: str, thinking: bool) -> tuple[list[dict], list[str], bool]:
    """Rendered text -> (messages in vLLM's normal form, declared tool names, thinking flag).

    Turn boundaries are split here; model text goes through vLLM's parsers (which strip surrounding
    whitespace of reasoning/content and return non-string argument scalars as their text); tool
    responses ``response:NAME{...}`` are read by the same tool-call parser.
    """
    assert text.startswith("<bos>"), text[:20]
    rest = text[len("<bos>"):]
    msgs: list[dict] = []
    declared: list[str] = []
    think_flag = False
    pos = 0
    while pos < len(rest):
        m = _TURN.match(rest, pos)
        assert m, f"no turn at {pos}: {rest[pos:pos + 40]!r}"
        role = m.group(1)
        end = rest.find("<turn|>\n", m.end())
        body = rest[m.end(): end if end >= 0 else len(rest)]
        pos = end + len("<turn|>\n") if end >= 0 else len(rest)
        if role in ("system", "user"):
            if role == "system":
                if body.startswith("<|think|>"):
                    think_flag, body = True, body[len("<|think|>"):]
                declared = _DECL.findall(body)
                body = _DECL.sub("", body)
            msgs.append({"role": role, "content": body})
            continue
        parts = _RESPONSE.split(body)
        for i, part in enumerate(parts):
            if i % 2 == 0:
                if i > 0 and part == "" and (i == len(parts) - 1):
                    continue  # turn closed (or still open) right after a tool response
                reasoning, content, calls = _vllm_parse_model_text(part, thinking)
                msgs.append({"role": "assistant", "reasoning": reasoning, "content": content, "tool_calls": calls})
            else:
                _r, _c, calls = _vllm_parse_model_text(f"<|tool_call>call:{part[len('response:'):]}<tool_call|>",
                                                       thinking)
                assert part.startswith("response:") and len(calls) == 1, part
                msgs.append({"role": "tool", "name": calls[0]["name"], "content": calls[0]["arguments"]})
    return _drop_ambiguous_empties(msgs), declared, think_flag


# ---------------------------------------------------------------- chat format properties ----------

def test_chat_format_roundtrip_and_transformers_render(stage_report):
    """render -> tokenize -> decode is the rendered text; HF's tokenizer and the fixture's template agree."""
    stats = Counter()
    hf = hf_tokenizer()

    def body(conv):
        text = _render_conv(conv)
        ids = encode(text)
        assert decode(ids) == text
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        hf_text = hf.apply_chat_template(template_messages(conv["messages"]), tools=conv["tools"], tokenize=False,
                                         enable_thinking=conv["enable_thinking"])
        assert hf_text == text
        stats["tokens"] += len(ids)
        stats["tool_calls"] += sum(len(m.get("tool_calls") or []) for m in conv["messages"])
        stats["thinking_on"] += int(conv["enable_thinking"])
        stats["empty_contents"] += sum(1 for m in conv["messages"] if m.get("content") in ("", None))

    counted_property(conversations(), body, stats)
    stage_report.check("chat_format_roundtrip", {"examples": stats["examples"], "failures": 0}, T.TOKENIZATION_PROPERTY,
                       hypothesis_examples=stats["examples"], **{k: v for k, v in stats.items() if k != "examples"})


def test_chat_format_parses_back_with_vllm_parsers(stage_report):
    """The rendered text parses back to the same messages with vLLM's Gemma 4 reasoning and tool-call parsers."""
    stats = Counter()

    def body(conv):
        text = _render_conv(conv)
        parsed, declared, think_flag = _parse_rendered(text, conv["enable_thinking"])
        assert parsed == _expected_messages(conv)
        assert declared == [t["function"]["name"] for t in conv["tools"] or []]
        assert think_flag == conv["enable_thinking"]
        stats["messages"] += len(parsed)
        stats["tool_calls"] += sum(len(m.get("tool_calls", [])) for m in parsed)

    counted_property(conversations(), body, stats)
    stage_report.check("chat_format_parse_back_vllm", {"examples": stats["examples"], "failures": 0},
                       T.TOKENIZATION_PROPERTY, hypothesis_examples=stats["examples"],
                       messages=stats["messages"], tool_calls=stats["tool_calls"])


def test_chat_format_is_append_only_in_tokens(stage_report):
    """Rendering conversation[:k+1] (with a generation prompt before an assistant turn) is a token prefix of the whole."""
    stats = Counter()

    def body(conv):
        msgs = conv["messages"]
        full_ids = encode(_render_conv(conv))
        for k in range(len(msgs)):
            plain = encode(_render_conv(conv, msgs[: k + 1]))
            assert full_ids[: len(plain)] == plain, f"messages[:{k + 1}] is not a token prefix"
            stats["prefixes"] += 1
            if k + 1 < len(msgs) and msgs[k + 1]["role"] == "assistant":
                prompt = encode(_render_conv(conv, msgs[: k + 1], add_generation_prompt=True))
                assert full_ids[: len(prompt)] == prompt, f"messages[:{k + 1}] + generation prompt is not a token prefix"
                stats["generation_prompts"] += 1

    counted_property(conversations(), body, stats)
    stage_report.check("chat_format_append_only", {"examples": stats["examples"], "failures": 0},
                       T.TOKENIZATION_PROPERTY, hypothesis_examples=stats["examples"],
                       prefixes_checked=stats["prefixes"], generation_prompts_checked=stats["generation_prompts"])


def test_strip_thoughts_template_is_not_append_only():
    """The thought-stripping variant rewrites history once a later user turn arrives (what the live test relies on)."""
    conv = {"messages": [{"role": "user", "content": "a"},
                         {"role": "assistant", "reasoning_content": "think", "content": "b"},
                         {"role": "user", "content": "c"}], "tools": None, "enable_thinking": True}
    before = _render_conv(conv, conv["messages"][:2], template=STRIP_THOUGHTS_TEMPLATE)
    after = _render_conv(conv, template=STRIP_THOUGHTS_TEMPLATE)
    assert "<|channel>thought\nthink<channel|>" in before
    assert not after.startswith(before) and "<|channel>" not in after
