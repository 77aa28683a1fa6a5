"""SFT tokenization: messages -> chat template -> ids, with labels on assistant tokens only.

The conversation is rendered once with the chat template (no generation prompt) and tokenized with
offsets. An assistant message's labelled span is what the model would generate for it: from the end
of the generation prompt before it (``<|turn>model\\n``, or nothing when the model turn is still open
after a tool response) to the end of its rendering, minus the newline after ``<turn|>``, plus the
``<|tool_response>`` token that ends a tool-calling message (the model's stop token there). A token
is labelled when its first character lies in a labelled span. Uses the template's append-only
property (``render(messages[:k])`` is a prefix of ``render(messages)``); a template that breaks it is
reported, not silently mislabelled.

Conversations longer than ``max_length`` tokens are refused (dropped) and counted in the report.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gemma4_support.chat.template import render
from gemma4_support.errors import TokenizationError
from gemma4_support.serving.wire import template_messages

__all__ = ["SFTExample", "SFTReport", "sft_tokenize", "assistant_char_spans", "encode_with_offsets"]

IGNORE_INDEX = -100
_TURN_END = "<turn|>"
_TOOL_RESPONSE = "<|tool_response>"


@dataclass
class SFTExample:
    """One tokenized conversation: ids, 0/1 loss mask, labels (ids where trained, -100 elsewhere)."""

    input_ids: list[int]
    loss_mask: list[int]
    labels: list[int]
    conversation_index: int
    text: str


@dataclass
class SFTReport:
    """Counts of an SFT tokenization run; ``dropped`` conversations exceeded ``max_length``."""

    conversations: int = 0
    kept: int = 0
    dropped: int = 0
    dropped_indices: list[int] = field(default_factory=list)
    dropped_tokens: int = 0
    label_tokens: int = 0
    max_length: int = 0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of ``text`` with a ``tokenizers.Tokenizer`` or an HF fast tokenizer (no BOS added)."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        enc = tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def assistant_char_spans(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    enable_thinking: bool = False,
    template: str,
    train_on: Literal["all", "last"] = "all",
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and the ``[start, end)`` character spans the model generates, per assistant message."""
    msgs = template_messages(messages)
    tools = list(tools) if tools else None
    full = render(msgs, tools=tools, enable_thinking=enable_thinking, template=template)
    assistant = [k for k, m in enumerate(msgs) if m.get("role") in ("assistant", "model")]
    if train_on == "last":
        assistant = assistant[-1:]
    spans = []
    for k in assistant:
        head = render(msgs[:k], tools=tools, add_generation_prompt=True, enable_thinking=enable_thinking,
                      template=template)
        upto = render(msgs[: k + 1], tools=tools, enable_thinking=enable_thinking, template=template)
        if not full.startswith(upto) or not upto.startswith(head):
            raise TokenizationError(
                f"the chat template is not append-only at message {k}: rendering messages[:{k + 1}] is not a "
                "prefix of the full rendering",
                "use an append-only chat template for SFT labels",
            )
        start, end = len(head), len(upto)
        if upto.endswith(_TURN_END + "\n"):
            end -= 1
        elif full.startswith(_TOOL_RESPONSE, end):
            end += len(_TOOL_RESPONSE)
        spans.append((start, end))
    return full, spans


def sft_tokenize(
    conversations: Sequence[Sequence[Mapping[str, Any]] | Mapping[str, Any]],
    *,
    max_length: int,
    tokenizer: Any,
    template: str | None = None,
    train_on: Literal["all", "last"] = "all",
    tools: Sequence[Mapping[str, Any]] | None = None,
    enable_thinking: bool = False,
) -> tuple[list[SFTExample], SFTReport]:
    """Tokenize conversations for SFT with assistant-only labels; drop (and count) those over ``max_length``.

    A conversation is a list of messages or a dict with ``messages`` and optional ``tools`` /
    ``enable_thinking``. ``train_on="last"`` labels only the last assistant message. ``tokenizer``: a
    ``tokenizers.Tokenizer`` or an HF fast tokenizer; ``template`` defaults to the tokenizer's ``chat_template``.
    """
    if train_on not in ("all", "last"):
        raise TokenizationError(f"train_on={train_on!r}", "use 'all' or 'last'")
    if max_length <= 0:
        raise TokenizationError(f"max_length={max_length}", "pass a positive maximum sequence length")
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise TokenizationError("no chat template: the tokenizer carries none and none was passed",
                                "pass template=... (the checkpoint's chat_template.jinja) or an HF tokenizer that has one")
    report = SFTReport(conversations=len(conversations), max_length=max_length)
    examples: list[SFTExample] = []
    for idx, conv in enumerate(conversations):
        if isinstance(conv, Mapping):
            messages = conv["messages"]
            conv_tools = conv.get("tools", tools)
            thinking = conv.get("enable_thinking", enable_thinking)
        else:
            messages, conv_tools, thinking = conv, tools, enable_thinking
        if not any(m.get("role") in ("assistant", "model") for m in messages):
            raise TokenizationError(f"conversation {idx} has no assistant message to train on",
                                    "drop it before SFT tokenization or add the assistant reply")
        text, spans = assistant_char_spans(messages, tools=conv_tools, enable_thinking=thinking,
                                           template=template, train_on=train_on)
        ids, offsets = encode_with_offsets(tokenizer, text)
        if len(ids) > max_length:
            report.dropped += 1
            report.dropped_indices.append(idx)
            report.dropped_tokens += len(ids)
            continue
        mask = [1 if any(a <= off[0] < b for a, b in spans) else 0 for off in offsets]
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        report.kept += 1
        report.label_tokens += sum(mask)
        examples.append(SFTExample(ids, mask, labels, idx, text))
    return examples, report
