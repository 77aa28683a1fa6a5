"""What a chat template does to history, found by rendering probe conversations (no format knowledge assumed).

RL tokenization needs to know where re-rendering a conversation stops extending the prompt the model saw:
a template is append-only when every later prompt starts with the earlier prompt followed by the model's
answer as the history renders it. Gemma 4's published template is not: the generation prompt's empty thought
channel (thinking off) is absent from the rendered history, and thoughts of model turns before the last user
message are dropped. `characterise` measures each of these on small probes and says where history changes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from gemma4_support.chat.template import content_format, render_prompt

__all__ = ["TemplateTraits", "characterise", "common_prefix_length", "history_change", "shared_markup_prefix"]

_THOUGHT = "the model reasons first"
_ANSWER = "the answer"
_TOOL = {"type": "function", "function": {"name": "probe", "description": "probe",
                                          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _markup_start(text: str, i: int, floor: int = 0) -> int:
    """`i`, or the start of the markup token (``<...>``) that `i` falls inside."""
    lt, gt = text.rfind("<", floor, i), text.rfind(">", floor, i)
    return lt if lt > gt else i


def shared_markup_prefix(a: str, b: str) -> int:
    """The common prefix length, cut back so that a markup token such as ``<|channel>`` is never split between
    the shared part and the rest."""
    cut = common_prefix_length(a, b)
    return cut if cut == min(len(a), len(b)) else _markup_start(a, cut)


def history_change(earlier: str, later: str, window: int = 16) -> dict:
    """Where `later` stops extending `earlier`, and the pieces of `earlier` it lacks: after each, `earlier`
    resumes in `later` (checked on `window` characters), or the rest of `earlier` is gone.
    {"position": where they part, "removed": [...]}; a rewrite shows as the rewritten text removed."""
    cut = shared_markup_prefix(earlier, later)
    i, p, resumed, removed = cut, cut, cut, []
    while i < len(earlier) and p < len(later):
        if earlier[i] == later[p]:
            i, p = i + 1, p + 1
            continue
        back = i - _markup_start(earlier, i, resumed)  # never split a markup token
        i, p = i - back, p - back
        probe = later[p:p + window]
        j = next((j for j in range(i + 1, len(earlier)) if earlier[j:j + len(probe)] == probe[: len(earlier) - j]),
                 len(earlier))  # else the rest of `earlier` is gone
        removed.append(earlier[i:j])
        i = resumed = j
    if i < len(earlier):
        removed.append(earlier[i:])
    return {"position": cut, "removed": removed}


@dataclass(frozen=True)
class TemplateTraits:
    """How a template re-renders history; the texts are what a later render lacks (empty: nothing lost)."""

    content_format: str
    generation_prompt_not_in_history: dict[str, str]  # thinking "on"/"off" -> generation-prompt text history lacks
    continuation_prompt_not_in_history: dict[str, str]  # the same after tool responses ("on"/"off", "+content")
    renders_answer_thought: bool  # the thought of the last model turn (an answer, no tool call) is rendered at all
    drops_past_thoughts: bool  # a model turn's thought is gone once a later user message follows
    keeps_tool_turn_thoughts: bool  # the thought of a tool-calling turn survives the tool response
    append_only: dict[str, bool]  # thinking "on"/"off" -> a two-exchange conversation re-renders append-only

    def rewrites(self) -> list[str]:
        """Where the template rewrites history, one phrase each ([] for an append-only template)."""
        out = [f"the generation prompt (thinking {k}) adds {v!r}, which the rendered history lacks"
               for k, v in self.generation_prompt_not_in_history.items() if v]
        out += [f"after tool responses (thinking {k}) the prompt has {v!r}, which the continued history lacks"
                for k, v in self.continuation_prompt_not_in_history.items() if v]
        if not self.renders_answer_thought:
            out.append("the thought of an answering model turn is never rendered (only tool-calling turns keep one)")
        if self.drops_past_thoughts:
            out.append("thoughts of model turns before the last user message are dropped")
        if not self.keeps_tool_turn_thoughts:
            out.append("a tool-calling turn's thought is dropped once its tool response follows")
        return out

    def to_dict(self) -> dict:
        """JSON-ready form, with the rewrites spelled out."""
        return {**asdict(self), "rewrites": self.rewrites()}


def characterise(template: str) -> TemplateTraits:
    """Render probe conversations with `template` and report how it re-renders history."""
    gen_extra, append_only = {}, {}
    for label, thinking in (("on", True), ("off", False)):
        def prompt(messages: list[dict], gen: bool = True, thinking: bool = thinking) -> str:
            return render_prompt(messages, template=template, enable_thinking=thinking, add_generation_prompt=gen)

        user = [{"role": "user", "content": "first question"}]
        answer = {"role": "assistant", "content": _ANSWER}
        if thinking:
            answer["reasoning"] = _THOUGHT
        head, history = prompt(user), prompt([*user, answer], gen=False)
        gen_extra[label] = head[shared_markup_prefix(head, history):]
        later = prompt([*user, answer, {"role": "user", "content": "second question"}])
        answered = history[: history.rfind(_ANSWER) + len(_ANSWER)]
        append_only[label] = not gen_extra[label] and later.startswith(answered)
    user = [{"role": "user", "content": "first question"}]
    thought = {"role": "assistant", "reasoning": _THOUGHT, "content": _ANSWER}
    renders = _THOUGHT in render_prompt([*user, thought], template=template, enable_thinking=True,
                                        add_generation_prompt=False)
    dropped = _THOUGHT not in render_prompt([*user, thought, {"role": "user", "content": "again"}],
                                            template=template, enable_thinking=True)
    call = {"role": "assistant", "reasoning": _THOUGHT, "content": "",
            "tool_calls": [{"id": "p1", "type": "function", "function": {"name": "probe", "arguments": {"q": "x"}}}]}
    response = {"role": "tool", "tool_call_id": "p1", "content": "ok"}
    kept = _THOUGHT in render_prompt([*user, call, response], template=template, tools=[_TOOL], enable_thinking=True)
    continuation = {}
    for label, thinking in (("on", True), ("off", False)):
        for suffix, said in (("", ""), ("+content", "calling the tool")):
            head = [*user, {**call, "content": said, "reasoning": None}, response]
            prompt = render_prompt(head, template=template, tools=[_TOOL], enable_thinking=thinking)
            history = render_prompt([*head, {"role": "assistant", "content": _ANSWER}], template=template,
                                    tools=[_TOOL], enable_thinking=thinking, add_generation_prompt=False)
            lost = [] if history.startswith(prompt) else history_change(prompt, history)["removed"]
            continuation[label + suffix] = "".join(lost)
    return TemplateTraits(content_format(template), gen_extra, continuation, renders, dropped, kept, append_only)
