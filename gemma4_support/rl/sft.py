"""SFT tokenization through any chat template: every assistant message labelled with what the model generates.

For assistant message k the model saw the prompt ``render_prompt(messages[:k])`` (the generation prompt
included — on Gemma 4's 26B/31B format with thinking off that is an empty thought channel) and generated its
turn: the text ``render(messages[:k+1])`` has after the part it shares with that prompt, up to the end of its
turn (``<turn|>``, or the ``<|tool_response>`` stop after unanswered tool calls; the trailing newline after
``<turn|>`` is not generated). Because message k is the last model turn of ``messages[:k+1]``, its thought is
rendered and trained even where a later re-render would drop it.

Turns are chained into one example while each prompt starts with the previous example's text (an append-only
stretch); where the template rewrites history — a dropped thought, a generation prompt the history lacks — a
new example starts and the report says what the template discarded there. A token is labelled when its first
character lies in a labelled span. Examples longer than ``max_length`` tokens are dropped and counted.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gemma4_support.chat.template import render_prompt
from gemma4_support.chat.traits import characterise, history_change, shared_markup_prefix
from gemma4_support.errors import TokenizationError

__all__ = ["SFTExample", "SFTReport", "assistant_turns", "encode_with_offsets", "sft_tokenize"]

IGNORE_INDEX = -100
_TURN_END = "<turn|>"
_TOOL_RESPONSE = "<|tool_response>"


@dataclass
class SFTExample:
    """One tokenized training example: ids, 0/1 loss mask, labels (ids where trained, -100 elsewhere)."""

    input_ids: list[int]
    loss_mask: list[int]
    labels: list[int]
    conversation_index: int
    text: str
    messages: list[int] = field(default_factory=list)  # the assistant messages it trains


@dataclass
class SFTReport:
    """Counts of an SFT tokenization run, and what the template discarded where it rewrote history."""

    conversations: int = 0
    examples: int = 0
    trained_turns: int = 0
    dropped: int = 0
    dropped_indices: list[int] = field(default_factory=list)
    dropped_tokens: int = 0
    label_tokens: int = 0
    max_length: int = 0
    splits: list[dict] = field(default_factory=list)  # conversation, message, where and what the template changed
    untrainable: list[dict] = field(default_factory=list)  # conversation, message, what was not trained and why

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


@dataclass(frozen=True)
class AssistantTurn:
    """One assistant message as the model generated it: the prompt it saw, the text it produced, the prompt text
    the rendered history lacks, and what of the message could not be trained (with why)."""

    message: int
    prompt: str
    generated: str
    prompt_not_in_history: str = ""
    untrainable: str = ""


_REASONING = ("reasoning", "reasoning_content")


def _turn(messages: Sequence[Mapping[str, Any]], k: int, options: dict) -> AssistantTurn:
    prompt = render_prompt(messages[:k], **options)
    upto = render_prompt(messages[: k + 1], **options, add_generation_prompt=False)
    cut = shared_markup_prefix(prompt, upto)
    generated = upto[cut:]
    if generated.endswith(_TURN_END + "\n"):
        generated = generated[:-1]
    if not generated:
        return AssistantTurn(k, prompt, "", prompt[cut:], "the whole turn (it renders no text of its own)")
    return AssistantTurn(k, prompt, generated, prompt[cut:])


@functools.lru_cache(maxsize=64)  # characterise renders a dozen probes: once per template, not per conversation
def _generation_prompt_not_in_history(template: str, enable_thinking: bool) -> str:
    return characterise(template).generation_prompt_not_in_history["on" if enable_thinking else "off"]


def assistant_turns(messages: Sequence[Mapping[str, Any]], *, template: str, tools: Sequence[Mapping] | None = None,
                    enable_thinking: bool = False) -> list[AssistantTurn]:
    """Every assistant message's generation prompt and generated text under `template`.

    The generated text must follow the whole prompt. Prompt text the history lacks is accepted only when it is
    what the template's plain generation prompt adds (measured by `characterise`, e.g. the closed empty thought
    of Gemma 4's 26B/31B prompt with thinking off). Otherwise a reasoning the prompt leaves no room for is not
    trained, and a turn whose prompt opens something its rendering never continues (a thought channel opened
    after a tool response for a message without reasoning) is not trained at all; `untrainable` says which."""
    options = dict(template=template, tools=list(tools) if tools else None, enable_thinking=enable_thinking)
    allowed = {"", _generation_prompt_not_in_history(template, enable_thinking)}
    out = []
    for k, m in enumerate(messages):
        if m.get("role") not in ("assistant", "model"):
            continue
        turn = _turn(messages, k, options)
        if turn.untrainable:
            out.append(turn)
            continue
        if turn.prompt_not_in_history not in allowed and any(m.get(key) for key in _REASONING):
            bare = [*messages[:k], {key: v for key, v in m.items() if key not in _REASONING}, *messages[k + 1:]]
            turn = _turn(bare, k, options)
            turn = AssistantTurn(k, turn.prompt, turn.generated, turn.prompt_not_in_history,
                                 f"reasoning (the generation prompt ends with {turn.prompt_not_in_history!r})")
        if turn.prompt_not_in_history not in allowed:
            turn = AssistantTurn(k, turn.prompt, "", turn.prompt_not_in_history,
                                 f"the whole turn (the generation prompt ends with {turn.prompt_not_in_history!r}, "
                                 "which its rendering never continues)")
        reasoning = next((m[key] for key in _REASONING if m.get(key)), "")
        if turn.generated and not turn.untrainable and reasoning.strip() and reasoning.strip() not in turn.generated:
            turn = AssistantTurn(k, turn.prompt, turn.generated, turn.prompt_not_in_history,
                                 "reasoning (the template does not render it for this message)")
        out.append(turn)
    return out


def _chain(turns: list[AssistantTurn], index: int, report: SFTReport) -> list[tuple[str, list, list]]:
    """Chain turns into (text, labelled spans, messages) while each prompt extends the text so far."""
    chains: list[tuple[str, list, list]] = []
    for turn in turns:
        start, end = len(turn.prompt), len(turn.prompt) + len(turn.generated)
        if chains and turn.prompt.startswith(chains[-1][0]):
            _, spans, msgs = chains[-1]
            chains[-1] = (turn.prompt + turn.generated, [*spans, (start, end)], [*msgs, turn.message])
            continue
        if chains:
            report.splits.append({"conversation": index, "message": turn.message,
                                  **history_change(chains[-1][0], turn.prompt)})
        chains.append((turn.prompt + turn.generated, [(start, end)], [turn.message]))
    return chains


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
    """Tokenize conversations for SFT with assistant-only labels; drop (and count) examples over ``max_length``.

    A conversation is a list of messages or a dict with ``messages`` and optional ``tools`` /
    ``enable_thinking``. ``train_on="last"`` trains only the last assistant message. ``tokenizer``: a
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
    if not isinstance(template, str):  # an HF tokenizer with several named templates
        raise TokenizationError(f"the tokenizer carries named chat templates {sorted(template)}, not one",
                                "pass template=... (e.g. gemma4_support.chat.template.checkpoint_template(model_dir))")
    report = SFTReport(conversations=len(conversations), max_length=max_length)
    examples: list[SFTExample] = []
    for idx, conv in enumerate(conversations):
        if isinstance(conv, Mapping):
            messages, conv_tools = conv["messages"], conv.get("tools", tools)
            thinking = conv.get("enable_thinking", enable_thinking)
        else:
            messages, conv_tools, thinking = conv, tools, enable_thinking
        turns = assistant_turns(messages, template=template, tools=conv_tools, enable_thinking=thinking)
        if not turns:
            raise TokenizationError(f"conversation {idx} has no assistant message to train on",
                                    "drop it before SFT tokenization or add the assistant reply")
        if train_on == "last":
            turns = turns[-1:]
        report.untrainable += [{"conversation": idx, "message": t.message, "what": t.untrainable}
                               for t in turns if t.untrainable]
        for text, spans, msgs in _chain([t for t in turns if t.generated], idx, report):
            ids, offsets = encode_with_offsets(tokenizer, text)
            if len(ids) > max_length:
                report.dropped += 1
                report.dropped_indices.append(idx)
                report.dropped_tokens += len(ids)
                continue
            mask = [1 if any(a <= off[0] < b for a, b in spans) else 0 for off in offsets]
            examples.append(SFTExample(ids, mask, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], idx, text, msgs))
            report.examples += 1
            report.trained_turns += len(msgs)
            report.label_tokens += sum(mask)
    return examples, report
