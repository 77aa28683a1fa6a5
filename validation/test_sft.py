"""Stage tokenization, SFT labels through the chat template under test: every assistant message trained with
what the model generates after the generation prompt it saw (its thought included), chained while the template
is append-only, split where it rewrites history with what it discarded reported, untrainable parts reported,
never dropped silently; over-long examples refused and counted."""
from __future__ import annotations

from collections import Counter

import pytest

from fixtures.chat_template import CHAT_TEMPLATE, KEEP_THOUGHTS_TEMPLATE
from fixtures.conversations import conversations
from fixtures.tokenizer import build_tokenizer, decode, encode
from gemma4_support.chat.template import render_prompt
from gemma4_support.errors import TokenizationError
from gemma4_support.rl.sft import sft_tokenize
from validation import thresholds as T
from validation.properties import check_property

pytestmark = pytest.mark.stage_tokenization

TOKENIZER = build_tokenizer()
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "reasoning_content": "Call the tool.", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny ☀"},
    {"role": "assistant", "reasoning": "It is sunny.", "content": "Sunny."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "reasoning": "Be polite.", "content": "You're welcome!"},
]
CALL_TEXT = '<|tool_call>call:get_weather{city:<|"|>Zürich<|"|>}<tool_call|>'


def _trained(example) -> str:  # noqa: ANN001
    return decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])


def test_thinking_and_tool_calls_on_the_26b_31b_format(stage_report) -> None:
    """Thinking on: each turn's thought and answer (or call + stop) are trained; the later user message drops
    the earlier thoughts from the history, so the last exchange is its own example and the report says what went."""
    examples, report = sft_tokenize([CONV], max_length=4096, tokenizer=TOKENIZER, template=CHAT_TEMPLATE,
                                    enable_thinking=True)
    assert [e.messages for e in examples] == [[2, 4], [6]]
    # after the tool response the prompt itself opens the thought channel: the model writes the thought's text
    assert _trained(examples[0]) == ("<|channel>thought\nCall the tool.\n<channel|>" + CALL_TEXT + "<|tool_response>"
                                     "It is sunny.\n<channel|>Sunny.<turn|>")
    assert _trained(examples[1]) == "<|channel>thought\nBe polite.\n<channel|>You're welcome!<turn|>"
    for e in examples:
        assert e.labels == [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)] and decode(e.input_ids) == e.text
    assert examples[1].text.startswith(render_prompt(CONV[:6], template=CHAT_TEMPLATE, enable_thinking=True))
    (split,) = report.splits
    assert split["message"] == 6 and not report.untrainable
    assert split["removed"] == ["<|channel>thought\nCall the tool.\n<channel|>", "<|channel>thought\nIt is sunny.\n<channel|>"]
    stage_report.record("sft_26b_31b_thinking_tool_call", **report.to_dict())


def test_thinking_off_trains_answers_after_the_empty_thought_and_reports_reasoning() -> None:
    """Thinking off: the generation prompt closes an empty thought, the answer is trained after it, and a
    reasoning the prompt leaves no room for is reported untrainable, not silently lost."""
    examples, report = sft_tokenize([CONV], max_length=4096, tokenizer=TOKENIZER, template=CHAT_TEMPLATE)
    # after a tool response the prompt adds nothing with thinking off: the history's thought there is trainable
    assert [_trained(e) for e in examples] == [CALL_TEXT + "<|tool_response>",
                                               "<|channel>thought\nIt is sunny.\n<channel|>Sunny.<turn|>",
                                               "You're welcome!<turn|>"]
    assert all("<|turn>model\n<|channel>thought\n<channel|>" in e.text for e in (examples[0], examples[2]))
    assert sorted(u["message"] for u in report.untrainable) == [2, 6]
    assert all(u["what"].startswith("reasoning") for u in report.untrainable)


def test_an_append_only_template_chains_every_turn_into_one_example() -> None:
    examples, report = sft_tokenize([CONV], max_length=4096, tokenizer=TOKENIZER, template=KEEP_THOUGHTS_TEMPLATE,
                                    enable_thinking=True)
    assert [e.messages for e in examples] == [[2, 4, 6]] and report.splits == []
    assert _trained(examples[0]).endswith("<|channel>thought\nBe polite.\n<channel|>You're welcome!<turn|>")


def test_last_only_over_long_and_refusals() -> None:
    (last,), _ = sft_tokenize([CONV], max_length=4096, tokenizer=TOKENIZER, template=CHAT_TEMPLATE,
                              enable_thinking=True, train_on="last")
    assert _trained(last) == "<|channel>thought\nBe polite.\n<channel|>You're welcome!<turn|>"
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    long = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]
    options = {"tokenizer": TOKENIZER, "template": CHAT_TEMPLATE}
    limit = len(sft_tokenize([short], max_length=10_000, **options)[0][0].input_ids)
    examples, rep = sft_tokenize([short, long, short], max_length=limit, **options)
    assert [e.conversation_index for e in examples] == [0, 2]
    assert rep.dropped == 1 and rep.dropped_indices == [1] and rep.dropped_tokens > limit and rep.examples == 2
    with pytest.raises(TokenizationError, match="no assistant message"):
        sft_tokenize([[{"role": "user", "content": "hi"}]], max_length=100, **options)
    with pytest.raises(TokenizationError, match="no chat template"):
        sft_tokenize([short], max_length=100, tokenizer=TOKENIZER)
    from transformers import AutoTokenizer

    from fixtures.factory import fixture_dir

    named = AutoTokenizer.from_pretrained(fixture_dir("moe"))
    named.chat_template = {"default": CHAT_TEMPLATE, "tool_use": CHAT_TEMPLATE}  # an HF tokenizer's named templates
    with pytest.raises(TokenizationError, match=r"named chat templates \['default', 'tool_use'\]"):
        sft_tokenize([short], max_length=100, tokenizer=named)


def _check_conversation(conv: dict, stats: Counter) -> None:
    """Every assistant message is trained or reported untrainable; each labelled span is exactly the text after
    the prompt the model saw, and starts on a token boundary."""
    examples, report = sft_tokenize([conv], max_length=100_000, tokenizer=TOKENIZER, template=CHAT_TEMPLATE)
    assistants = {k for k, m in enumerate(conv["messages"]) if m["role"] == "assistant"}
    trained = [k for e in examples for k in e.messages]
    untrainable = {u["message"] for u in report.untrainable if u["what"].startswith("the whole turn")}
    assert sorted(trained) == sorted(assistants - untrainable) and len(trained) == len(set(trained))
    for e in examples:
        for k in e.messages:
            prompt = render_prompt(conv["messages"][:k], template=CHAT_TEMPLATE, tools=conv["tools"],
                                   enable_thinking=conv["enable_thinking"])
            assert e.text.startswith(prompt), f"message {k}: its example does not extend its generation prompt"
            assert encode(e.text)[: len(encode(prompt))] == encode(prompt), f"message {k}: prompt ids differ"
    assert len(report.splits) == max(len(examples) - 1, 0)
    stats["trained_turns"] += len(trained)
    stats["splits"] += len(report.splits)
    stats["untrainable"] += len(report.untrainable)


def test_sft_properties(stage_report) -> None:
    """Hypothesis conversations through the fixtures' template (thinking on and off)."""
    stats = Counter()

    def body(conv: dict) -> None:
        if any(m["role"] == "assistant" for m in conv["messages"]):
            _check_conversation(conv, stats)

    check_property(stage_report, "sft_properties", conversations(), body, stats, T.TOKENIZATION_PROPERTY)


def test_reasoning_a_template_never_renders_is_reported() -> None:
    """A template that renders no thought for an answering turn (Google's April 2026 26B/31B version keeps them
    only on tool-calling turns) would drop the reasoning from the target: it is reported, not silent."""
    no_thoughts = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                   "{{ m['content'] }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning": "think hard", "content": "ans"}]
    (example,), report = sft_tokenize([conv], max_length=999, tokenizer=TOKENIZER, template=no_thoughts,
                                      enable_thinking=True)
    assert _trained(example) == "ans<turn|>"
    assert report.untrainable == [{"conversation": 0, "message": 1,
                                   "what": "reasoning (the template does not render it for this message)"}]
