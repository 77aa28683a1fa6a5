"""Stage tokenization: the Gemma 4 chat format, RL tokenization from vLLM's own ids, and a live vLLM server.

* Chat format (hypothesis over conversations: system/user/model turns, thinking on/off, tool calls with
  nested unicode arguments, tool responses, empty contents): render -> tokenize -> decode is the
  rendered text; the fixture's shipped template renders the same text through transformers; the text
  parses back to the same messages with vLLM's own Gemma 4 reasoning and tool-call parsers; rendering
  ``conversation[:k+1]`` is a token prefix of the full rendering wherever the format promises it.
* Collapse (hypothesis over synthetic id streams): sequences concatenate exactly the ids given, masks
  and log-probs align token by token, one changed earlier token forces a new sequence exactly there.
* SFT: assistant-only labels, last-only labels, over-long conversations refused and counted.
* Live: a 3-turn rollout with thinking and a tool call against the session's real vLLM server.
* Server lifecycle: vLLM's own start-up error surfaces; nothing survives a stop, a failed start, or a
  whole pytest session whose test failed.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma4_support.chat.template import CHAT_TEMPLATE, STRIP_THOUGHTS_TEMPLATE, render
from gemma4_support.chat.tokenizer import TURN_END_ID, VOCAB_SIZE, _control_tokens, build_tokenizer
from gemma4_support.errors import ServerError, TokenizationError
from gemma4_support.rl import (
    SampledChoice,
    TrainingSequence,
    Trajectory,
    choice_reproduction,
    collapse_history,
    collapse_trajectories,
    sft_tokenize,
)
from gemma4_support.serving import (
    VLLMServer,
    decode_routed_experts,
    normalize_choice,
    start_server,
    template_messages,
)
from validation import thresholds as T

pytestmark = [pytest.mark.stage_tokenization, pytest.mark.xdist_group("vllm")]  # one vLLM server

REPO = Path(__file__).resolve().parents[1]
SPECIAL_STRINGS = tuple(_control_tokens())
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@lru_cache(maxsize=1)
def _tok():
    return build_tokenizer()


def _encode(text: str) -> list[int]:
    return list(_tok().encode(text, add_special_tokens=False).ids)


def _decode(ids) -> str:
    return _tok().decode(list(ids), skip_special_tokens=False)


@lru_cache(maxsize=1)
def _hf_tokenizer():
    from transformers import AutoTokenizer

    from fixtures.factory import fixture_dir

    return AutoTokenizer.from_pretrained(str(fixture_dir("moe")))


# ---------------------------------------------------------------- conversation strategies ----------

def _clean(s: str) -> bool:
    return not any(t in s for t in SPECIAL_STRINGS)


_SAMPLES = ["", " ", "\n", "  two  ", "café ☕", "日本語テキスト", "a<b>c", "{x:1}", "emoji 🧪🔧", "tab\there",
            "line1\nline2", "Ünïcödé", "call:f{a:1}", '"quoted"', "ends with space "]
texts = st.one_of(st.sampled_from(_SAMPLES), st.text(max_size=14).filter(_clean))
identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True)
scalars = st.one_of(
    texts, st.integers(-10**6, 10**6), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.booleans(), st.none(),
)
arg_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(identifiers, inner, max_size=3),
    max_leaves=6,
)
arguments = st.dictionaries(identifiers, arg_values, max_size=3)


@st.composite
def tool_decls(draw):
    name = draw(identifiers)
    props = draw(st.dictionaries(identifiers, st.sampled_from(["string", "number", "object"]), max_size=2))
    return {"type": "function", "function": {
        "name": name, "description": draw(texts),
        "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in props.items()}},
    }}


@st.composite
def conversations(draw):
    """A Gemma 4 conversation: optional system, 1-3 exchanges; a model turn may call tools and continue."""
    thinking = draw(st.booleans())
    tools = draw(st.lists(tool_decls(), max_size=2, unique_by=lambda t: t["function"]["name"]))
    names = [t["function"]["name"] for t in tools] or ["lookup"]
    msgs: list[dict] = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(texts)})
    n_calls = 0
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(texts)})
        segments = draw(st.integers(1, 3))
        for seg in range(segments):
            m: dict = {"role": "assistant", "content": draw(texts)}
            if draw(st.booleans()):
                m["reasoning_content"] = draw(texts)
            if seg < segments - 1:
                calls = []
                for _c in range(draw(st.integers(1, 2))):
                    n_calls += 1
                    calls.append({"id": f"call_{n_calls}", "type": "function", "function": {
                        "name": draw(st.sampled_from(names)),
                        "arguments": json.dumps(draw(arguments), ensure_ascii=False)}})
                m["tool_calls"] = calls
                if draw(st.booleans()):
                    m["content"] = None
                msgs.append(m)
                for c in calls:
                    content = draw(st.one_of(texts, arguments))
                    msgs.append({"role": "tool", "tool_call_id": c["id"], "content": content})
            else:
                msgs.append(m)
    cut = draw(st.integers(0, 2))  # sometimes end on a tool response or a user message
    if cut and len(msgs) > 2 and msgs[-1 - cut]["role"] in ("user", "tool"):
        msgs = msgs[: len(msgs) - cut]
    return {"messages": msgs, "tools": tools or None, "enable_thinking": thinking}


def _render_conv(conv: dict, messages=None, add_generation_prompt: bool = False, template: str = CHAT_TEMPLATE) -> str:
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


@lru_cache(maxsize=1)
def _vllm_parsers():
    """vLLM's registered Gemma 4 reasoning / tool-call parser classes and its request type.

    Importing vLLM imports torch modules that emit DeprecationWarnings at import time (not our code):
    they are silenced for the import only, so ``-W error`` runs still see every warning of ours.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager

        return (ReasoningParserManager.get_reasoning_parser("gemma4"), ToolParserManager.get_tool_parser("gemma4"),
                ChatCompletionRequest)


def _vllm_parse_model_text(text: str, thinking: bool) -> tuple[str, str, list[dict]]:
    """vLLM's Gemma 4 reasoning parser, then its tool-call parser, on one model message's text."""
    reasoning_cls, tool_cls, ChatCompletionRequest = _vllm_parsers()
    kwargs = {"chat_template_kwargs": {"enable_thinking": thinking}}
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **kwargs)
    reasoning, content = reasoning_cls(_hf_tokenizer(), **kwargs).extract_reasoning(text, request)
    info = tool_cls(_hf_tokenizer(), None).extract_tool_calls(content or "", request)
    calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in info.tool_calls]
    body = info.content if info.tools_called else content
    return (reasoning or "").strip(), (body or "").strip(), calls


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


def _counted_property(strategy, body, examples: Counter) -> None:
    """Run `body` as a hypothesis property over `strategy`, counting the examples it ran."""
    @PROPERTY_SETTINGS
    @given(strategy)
    def run(x):
        examples["examples"] += 1
        body(x)

    run()


# ---------------------------------------------------------------- chat format properties ----------

def test_chat_format_roundtrip_and_transformers_render(stage_report):
    """render -> tokenize -> decode is the rendered text; HF's tokenizer and the fixture's template agree."""
    stats = Counter()
    hf = _hf_tokenizer()

    def body(conv):
        text = _render_conv(conv)
        ids = _encode(text)
        assert _decode(ids) == text
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        hf_text = hf.apply_chat_template(template_messages(conv["messages"]), tools=conv["tools"], tokenize=False,
                                         enable_thinking=conv["enable_thinking"])
        assert hf_text == text
        stats["tokens"] += len(ids)
        stats["tool_calls"] += sum(len(m.get("tool_calls") or []) for m in conv["messages"])
        stats["thinking_on"] += int(conv["enable_thinking"])
        stats["empty_contents"] += sum(1 for m in conv["messages"] if m.get("content") in ("", None))

    _counted_property(conversations(), body, stats)
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

    _counted_property(conversations(), body, stats)
    stage_report.check("chat_format_parse_back_vllm", {"examples": stats["examples"], "failures": 0},
                       T.TOKENIZATION_PROPERTY, hypothesis_examples=stats["examples"],
                       messages=stats["messages"], tool_calls=stats["tool_calls"])


def test_chat_format_is_append_only_in_tokens(stage_report):
    """Rendering conversation[:k+1] (with a generation prompt before an assistant turn) is a token prefix of the whole."""
    stats = Counter()

    def body(conv):
        msgs = conv["messages"]
        full_ids = _encode(_render_conv(conv))
        for k in range(len(msgs)):
            plain = _encode(_render_conv(conv, msgs[: k + 1]))
            assert full_ids[: len(plain)] == plain, f"messages[:{k + 1}] is not a token prefix"
            stats["prefixes"] += 1
            if k + 1 < len(msgs) and msgs[k + 1]["role"] == "assistant":
                prompt = _encode(_render_conv(conv, msgs[: k + 1], add_generation_prompt=True))
                assert full_ids[: len(prompt)] == prompt, f"messages[:{k + 1}] + generation prompt is not a token prefix"
                stats["generation_prompts"] += 1

    _counted_property(conversations(), body, stats)
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


# ---------------------------------------------------------------- collapse properties -------------

token_ids = st.integers(0, VOCAB_SIZE - 1)


@st.composite
def id_histories(draw, max_choices: int = 5):
    """An append-only history of choices over random ids: each prompt = previous prompt + completion + new suffix."""
    n = draw(st.integers(1, max_choices))
    buffer: list[int] = draw(st.lists(token_ids, min_size=1, max_size=8))
    choices = []
    for k in range(n):
        prompt = buffer if k == 0 else buffer + draw(st.lists(token_ids, max_size=6))
        completion = draw(st.lists(token_ids, max_size=6))
        lps = draw(st.lists(st.floats(-30.0, 0.0), min_size=len(completion), max_size=len(completion)))
        choices.append(SampledChoice(tuple(prompt), tuple(completion), tuple(lps)))
        buffer = list(prompt) + list(completion)
    return choices


def _as_form(choice: SampledChoice, form: int):
    """The same choice as vLLM JSON (dict), as an OpenAI-client Choice, or as a SampledChoice."""
    if form == 0:
        return choice
    raw = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": ""},
           "logprobs": {"content": [{"token": f"token_id:{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
                                    for t, lp in zip(choice.token_ids, choice.logprobs)]},
           "token_ids": list(choice.token_ids)}
    if form == 1:
        return normalize_choice(raw, list(choice.prompt_token_ids))
    from openai.types.chat.chat_completion import Choice

    return normalize_choice(Choice.model_validate(raw), list(choice.prompt_token_ids))


def _check_sequences_carry_choices(choices: list[SampledChoice], seqs: list[TrainingSequence]) -> None:
    """Masks and log-probs align token by token; mask-1 tokens are exactly the completions, in order."""
    trained, trained_lps = [], []
    for s in seqs:
        assert len(s.input_ids) == len(s.loss_mask) == len(s.logprobs)
        for t, m, lp in zip(s.input_ids, s.loss_mask, s.logprobs):
            if m:
                trained.append(t)
                trained_lps.append(lp)
            else:
                assert lp == 0.0
        for ci, (a, b) in zip(s.choice_indices, s.completion_spans):
            assert s.input_ids[a:b] == list(choices[ci].token_ids)
            assert s.logprobs[a:b] == list(choices[ci].logprobs)
            assert s.input_ids[:a] == list(choices[ci].prompt_token_ids)
    assert trained == [t for c in choices for t in c.token_ids]
    assert trained_lps == [lp for c in choices for lp in c.logprobs]


def test_collapse_append_only_histories_into_one_sequence(stage_report):
    """Append-only id streams collapse into one sequence that concatenates exactly the ids given."""
    stats = Counter()

    def body(args):
        choices, forms = args
        seqs, splits = collapse_history([_as_form(c, f) for c, f in zip(choices, forms)], vocab_size=VOCAB_SIZE)
        assert len(seqs) == 1 and not splits
        s = seqs[0]
        expected = list(choices[0].prompt_token_ids) + list(choices[0].token_ids)
        for prev, c in zip(choices, choices[1:]):
            expected += list(c.prompt_token_ids[len(prev.prompt_token_ids) + len(prev.token_ids):]) + list(c.token_ids)
        assert s.input_ids == expected == list(choices[-1].prompt_token_ids) + list(choices[-1].token_ids)
        _check_sequences_carry_choices(choices, seqs)
        traj = Trajectory(choices=choices)
        rep = choice_reproduction(traj, seqs)
        assert rep["choices_reproduced_frac"] == 1.0 and rep["untracked_trained_tokens"] == 0
        stats["choices"] += len(choices)
        stats["tokens"] += len(s)

    strategy = id_histories().flatmap(
        lambda cs: st.tuples(st.just(cs), st.lists(st.integers(0, 2), min_size=len(cs), max_size=len(cs))))
    _counted_property(strategy, body, stats)
    stage_report.check("collapse_append_only", {"examples": stats["examples"], "failures": 0}, T.TOKENIZATION_PROPERTY,
                       hypothesis_examples=stats["examples"], choices=stats["choices"], tokens=stats["tokens"])


def test_collapse_single_changed_token_forces_new_sequence(stage_report):
    """Changing one earlier token of a later prompt starts a new sequence exactly at that choice and position."""
    stats = Counter()

    @st.composite
    def mutated(draw):
        choices = draw(id_histories(max_choices=5).filter(lambda cs: len(cs) >= 2))
        j = draw(st.integers(1, len(choices) - 1))
        prev = choices[j - 1]
        buffer_len = len(prev.prompt_token_ids) + len(prev.token_ids)
        i = draw(st.integers(0, buffer_len - 1))
        old = choices[j].prompt_token_ids[i]
        new = draw(token_ids.filter(lambda t: t != old))
        prompt = list(choices[j].prompt_token_ids)
        prompt[i] = new
        choices = list(choices)
        choices[j] = SampledChoice(tuple(prompt), choices[j].token_ids, choices[j].logprobs)
        return choices, j, i

    def body(args):
        choices, j, i = args
        seqs, splits = collapse_history(choices, vocab_size=VOCAB_SIZE)
        assert splits and splits[0].choice_index == j and splits[0].first_mismatch == i
        assert len(seqs) == 1 + len(splits) >= 2
        assert seqs[0].choice_indices == list(range(j))
        _check_sequences_carry_choices(choices, seqs)
        rep = choice_reproduction(Trajectory(choices=choices), seqs)
        assert rep["choices_reproduced_frac"] == 1.0 and rep["untracked_trained_tokens"] == 0
        stats["splits"] += len(splits)
        stats["sequences"] += len(seqs)

    _counted_property(mutated(), body, stats)
    stage_report.check("collapse_changed_token_splits", {"examples": stats["examples"], "failures": 0},
                       T.TOKENIZATION_PROPERTY, hypothesis_examples=stats["examples"], splits=stats["splits"],
                       sequences=stats["sequences"])


def test_collapse_report_counts_trajectories_and_histories(stage_report):
    """Several trajectories with additional histories: the report counts sequences and collapsed trajectories."""
    stats = Counter()

    @st.composite
    def batches(draw):
        trajs, expect_collapsed = [], 0
        for _ in range(draw(st.integers(1, 4))):
            main = draw(id_histories(max_choices=3))
            extra = draw(st.lists(id_histories(max_choices=2), max_size=2))
            broken = draw(st.booleans()) and len(main) >= 2
            if broken:  # rewrite the first prompt token of the second choice
                c = main[1]
                p = list(c.prompt_token_ids)
                p[0] = (p[0] + 1) % VOCAB_SIZE
                main = [main[0], SampledChoice(tuple(p), c.token_ids, c.logprobs), *main[2:]]
            expect_collapsed += 0 if broken else 1
            trajs.append(Trajectory(choices=main, additional_histories=extra))
        return trajs, expect_collapsed

    def body(args):
        trajs, expect_collapsed = args
        seqs, report = collapse_trajectories(trajs, vocab_size=VOCAB_SIZE)
        assert report.trajectories == len(trajs)
        assert report.histories == sum(1 + len(t.additional_histories) for t in trajs)
        assert report.sequences == len(seqs) == report.histories + len(report.splits)
        assert report.collapsed_trajectories == expect_collapsed
        assert report.completion_tokens == sum(len(c.token_ids) for t in trajs for h in t.histories() for c in h)
        rep = choice_reproduction(trajs, seqs)
        assert rep["choices_reproduced_frac"] == 1.0 and rep["untracked_trained_tokens"] == 0
        stats["trajectories"] += report.trajectories
        stats["collapsed"] += report.collapsed_trajectories

    _counted_property(batches(), body, stats)
    stage_report.check("collapse_report_counts", {"examples": stats["examples"], "failures": 0}, T.TOKENIZATION_PROPERTY,
                       hypothesis_examples=stats["examples"], trajectories=stats["trajectories"],
                       collapsed_trajectories=stats["collapsed"])


def _good(prompt=(2, 5, 6), completion=(7, 8), lps=(-1.0, -2.0)) -> dict:
    return {"prompt_token_ids": list(prompt), "token_ids": list(completion),
            "logprobs": {"content": [{"token": "x", "logprob": lp} for lp in lps]}}


@pytest.mark.parametrize("bad, needle", [
    ({"prompt_token_ids": None}, "has no prompt_token_ids"),
    ({"token_ids": None}, "has no token_ids"),
    ({"logprobs": None}, "has no logprobs"),
    ({"logprobs": {"content": [{"token": "x", "logprob": -1.0}]}}, "has 1 logprobs for 2 completion tokens"),
    ({"token_ids": [7, VOCAB_SIZE]}, f"token id {VOCAB_SIZE} at completion position 1, outside the vocabulary"),
    ({"prompt_token_ids": [2, -1]}, "token id -1 at prompt position 1"),
    ({"token_ids": [7, "8"]}, "is not an integer token id"),
    ({"logprobs": {"content": [{"token": "x", "logprob": -1.0}, {"token": "y", "logprob": float("nan")}]}},
     "NaN logprob at completion position 1"),
])
def test_collapse_refuses_bad_choices_naming_them(bad, needle):
    """Missing ids, logprob count != completion length, ids outside the vocabulary: a clear error naming the choice."""
    trajs = [Trajectory(choices=[_good()]),
             Trajectory(choices=[_good(), _good((2, 5, 6, 7, 8, 9)), {**_good((2, 5, 6, 7, 8, 9, 7, 8, 1)), **bad}])]
    with pytest.raises(TokenizationError) as exc:
        collapse_trajectories(trajs, vocab_size=VOCAB_SIZE)
    msg = str(exc.value)
    assert "trajectory 1, choice 2" in msg and needle in msg and " — fix: " in msg


def test_client_normalises_ids_and_decodes_routed_experts():
    """Choices carry prompt/completion ids as int lists in model_extra; routed_experts (base64 .npy) is decoded."""
    from openai.types.chat.chat_completion import ChatCompletion

    routing = np.arange(3 * 3 * 2, dtype=np.int32).reshape(3, 3, 2)  # [prompt 3 + completion 1 - 1, layers, top_k]
    buf = io.BytesIO()
    np.save(buf, routing)
    raw = {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "m",
           "prompt_token_ids": np.array([2, 105, 9]),
           "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "a"},
                        "token_ids": (7.0,), "routed_experts": base64.b64encode(buf.getvalue()).decode()}]}
    resp = ChatCompletion.model_validate({**raw, "prompt_token_ids": [2, 105, 9]})
    choice = normalize_choice(resp.choices[0], raw["prompt_token_ids"])
    assert choice.model_extra["prompt_token_ids"] == [2, 105, 9]
    assert choice.model_extra["token_ids"] == [7] and isinstance(choice.model_extra["token_ids"][0], int)
    np.testing.assert_array_equal(choice.model_extra["routed_experts"], routing)
    seqs, _ = collapse_history([choice], require_logprobs=False)
    np.testing.assert_array_equal(seqs[0].routed_experts, routing)  # covers prompt + completion - 1 tokens
    with pytest.raises(ServerError, match="base64"):
        decode_routed_experts("not base64 npy")


# ---------------------------------------------------------------- SFT ------------------------------

def _sft_conv() -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "reasoning_content": "Call the tool.", "content": "Checking.",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "days": [1, 2]}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny ☀"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome!"},
    ]


def test_sft_labels_assistant_tokens_only():
    """All-assistant and last-only labels cover exactly what the model generates (incl. its stop tokens)."""
    conv = _sft_conv()
    (ex,), rep = sft_tokenize([conv], max_length=4096, enable_thinking=True)
    trained = _decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert trained == ('<|channel>thought\nCall the tool.<channel|>Checking.<|tool_call>call:get_weather'
                       '{city:<|"|>Zürich<|"|>,days:[1,2]}<tool_call|><|tool_response>'
                       "Sunny.<turn|>You're welcome!<turn|>")
    assert ex.labels == [t if m else -100 for t, m in zip(ex.input_ids, ex.loss_mask)]
    assert _decode(ex.input_ids) == ex.text and rep.kept == 1 and rep.label_tokens == sum(ex.loss_mask)
    (last,), _ = sft_tokenize([conv], max_length=4096, enable_thinking=True, train_on="last")
    assert _decode([t for t, m in zip(last.input_ids, last.loss_mask) if m]) == "You're welcome!<turn|>"
    with pytest.raises(TokenizationError, match="not append-only at message 2"):
        sft_tokenize([conv], max_length=4096, enable_thinking=True, template=STRIP_THOUGHTS_TEMPLATE)


def test_sft_refuses_conversations_over_max_length():
    """Conversations longer than max_length are dropped and counted, the rest kept."""
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    long = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]
    limit = len(sft_tokenize([short], max_length=10_000)[0][0].input_ids)
    examples, rep = sft_tokenize([short, long, short], max_length=limit)
    assert [e.conversation_index for e in examples] == [0, 2]
    assert rep.dropped == 1 and rep.dropped_indices == [1] and rep.dropped_tokens > limit and rep.kept == 2
    with pytest.raises(TokenizationError, match="no assistant message"):
        sft_tokenize([[{"role": "user", "content": "hi"}]], max_length=100)


# ---------------------------------------------------------------- live rollout --------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                    "units": {"type": "object"}}, "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "You are a terse weather assistant."}
USER1 = {"role": "user", "content": "What's the weather in Zürich? Think first."}
USER2 = {"role": "user", "content": "And tomorrow — 明日は?"}
REASONING1 = "The user wants Zürich's weather; I should call get_weather."
PREFILL1 = "Calling the tool: "
CALL1 = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(
    {"city": "Zürich", "days": 2, "units": {"temp": "°C", "wind": ["km/h", "Bft"]}}, ensure_ascii=False)}}
TOOL1 = {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 °C ☀ and a light breeze"}
_MARK = "\x00CONTINUE\x00"


def _canonical_token_ids(tokenizer) -> list[int]:
    """Byte tokens whose character takes part in no BPE merge and no special string: any sequence of
    them decodes to text that re-encodes to exactly the same ids, so re-rendering sampled text is exact."""
    from gemma4_support.chat.tokenizer import _byte_alphabet

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    in_merges = set()
    for merge in model["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        in_merges.update((a, b))
    alphabet = _byte_alphabet()
    ids = []
    for byte in range(0x21, 0x7F):
        ch, sym = chr(byte), alphabet[byte]
        if sym not in in_merges and ch not in "<|>" and sym in model["vocab"]:
            ids.append(model["vocab"][sym])
    return ids


def _library_prompt_ids(tokenizer, messages, template, continue_final: bool) -> list[int]:
    """The prompt ids the library's template + tokenizer give for a request (continue_final_message as transformers does)."""
    msgs = template_messages(messages)
    if continue_final:
        msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + _MARK}
        text = render(msgs, tools=TOOLS, add_generation_prompt=False, enable_thinking=True, template=template)
        text = text[: text.rindex(_MARK)]
    else:
        text = render(msgs, tools=TOOLS, add_generation_prompt=True, enable_thinking=True, template=template)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _rollout(client, tokenizer, template: str, allowed: list[int], seed: int) -> tuple[Trajectory, dict]:
    """Three model calls of one conversation (see test_live_rollout_collapses_to_vllm_ids)."""
    per_request = {} if template == CHAT_TEMPLATE else {"chat_template": template}
    info: dict = {"response_ids": [], "prompt_lengths": [], "completion_ids": [], "finish_reasons": []}
    mismatches = 0
    choices = []

    def call(messages, continue_final, allow, max_tokens):
        nonlocal mismatches
        resp = client.chat(messages, tools=TOOLS, enable_thinking=True, max_tokens=max_tokens, seed=seed,
                           continue_final_message=continue_final, allowed_token_ids=allow, **per_request)
        choice = resp.choices[0]
        expected = _library_prompt_ids(tokenizer, messages, template, continue_final)
        mismatches += int(choice.model_extra["prompt_token_ids"] != expected)
        info["response_ids"].append(resp.id)
        info["prompt_lengths"].append(len(choice.model_extra["prompt_token_ids"]))
        info["completion_ids"].append(choice.model_extra["token_ids"])
        info["finish_reasons"].append(choice.finish_reason)
        choices.append(choice)
        ids = [t for t in choice.model_extra["token_ids"] if t != TURN_END_ID]
        return tokenizer.decode(ids, skip_special_tokens=False)

    # Turn 1: the model continues the assistant's answer after a fixed thought (prefill, prompt side).
    prefill = {"role": "assistant", "reasoning_content": REASONING1, "content": PREFILL1}
    text1 = call([SYSTEM, USER1, prefill], True, allowed, 6)
    a1 = {"role": "assistant", "reasoning_content": REASONING1, "content": PREFILL1 + text1, "tool_calls": [CALL1]}
    # Turn 2: after the tool response the model turn is still open; the model writes the answer.
    text2 = call([SYSTEM, USER1, a1, TOOL1], False, allowed + [TURN_END_ID], 6)
    a2 = {"role": "assistant", "content": text2}
    # Turn 3: a new user turn; under the thought-stripping template a1's thought disappears here.
    text3 = call([SYSTEM, USER1, a1, TOOL1, a2, USER2], False, allowed + [TURN_END_ID], 4)
    messages = [SYSTEM, USER1, a1, TOOL1, a2, USER2, {"role": "assistant", "content": text3}]
    info["prompt_id_mismatches"] = mismatches
    return Trajectory(messages=messages, choices=choices), info


def _collapse_metrics(traj, info: dict, vocab: int):  # noqa: ANN001, ANN202
    """Collapse a live rollout; (sequences, report, metrics: reproduction, prompt mismatches, collapse counts)."""
    seqs, report = collapse_trajectories(traj, vocab_size=vocab)
    metrics = {**choice_reproduction(traj, seqs), "prompt_id_mismatches": info["prompt_id_mismatches"],
               "sequences": report.sequences, "collapsed_trajectories": report.collapsed_trajectories,
               "splits": len(report.splits)}
    return seqs, report, metrics


@pytest.mark.slow
def test_live_rollout_collapses_to_vllm_ids(vllm_server: VLLMServer, stage_report):
    """A 3-turn rollout with thinking and a tool call against the real vLLM server.

    Design (the model is random, so the conversation is driven from outside, and every claim is exact):
    turn 1 sends system + user + an assistant *prefill* (a fixed thought and the start of the answer,
    ``continue_final_message``); the model samples the rest of the answer. The history sent back for turn 2
    is that assistant message with its thought, the prefill plus the *decoded sampled text*, and a tool
    call with nested unicode arguments, then a tool response; the turn stays open and the model samples
    the answer; turn 3 adds a new user message. Sampling is restricted (``allowed_token_ids``) to byte tokens
    that take part in no BPE merge and no special string (``<turn|>`` allowed where it ends a turn), so the
    sampled text re-renders to exactly the sampled ids: re-rendering the history then extends each earlier
    prompt + completion *iff* the template is append-only, which is the property under test.

    Checks: every turn's ``prompt_token_ids`` from vLLM equal the library's template + tokenizer; with the
    main template the rollout collapses into one sequence reproducing every choice (ids, mask, vLLM's
    log-probs); with the thought-stripping template the same rollout splits at turn 3 and the report says
    so, still reproducing every choice; and (sensitivity) re-rendering the history instead of using vLLM's
    ids is caught on the thought-stripping template.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(vllm_server.model_dir or _hf_tokenizer().name_or_path))
    allowed = _canonical_token_ids(tokenizer)
    assert len(allowed) >= 8, f"only {len(allowed)} merge-free byte tokens in this tokenizer"
    client = vllm_server.client()
    vocab = len(tokenizer)

    # Append-only template: one sequence.
    traj, info = _rollout(client, tokenizer, CHAT_TEMPLATE, allowed, seed=11)
    seqs, report, metrics = _collapse_metrics(traj, info, vocab)
    stage_report.check("live_append_only_template", metrics, T.TOKENIZATION_LIVE_APPEND_ONLY,
                       collapse=report.to_dict(), server=vllm_server.base_url, model=vllm_server.model,
                       allowed_token_ids=len(allowed), **info)
    assert seqs[0].input_ids == traj.choices[-1].model_extra["prompt_token_ids"] + traj.choices[-1].model_extra["token_ids"]

    # Thought-stripping template: the same rollout splits where history changed.
    traj_s, info_s = _rollout(client, tokenizer, STRIP_THOUGHTS_TEMPLATE, allowed, seed=11)
    seqs_s, report_s, metrics_s = _collapse_metrics(traj_s, info_s, vocab)
    stage_report.check("live_thought_stripping_template", metrics_s, T.TOKENIZATION_LIVE_STRIPPED,
                       collapse=report_s.to_dict(), **info_s)
    assert [s.choice_index for s in report_s.splits] == [2], report_s.splits
    assert report_s.splits[0].reason.startswith("prompt rewrites earlier context")
    assert report_s.collapsed_trajectories == 0 and report_s.sequences == 2

    # Sensitivity: a trainer that re-renders the final conversation (and labels every model-turn token)
    # instead of using vLLM's ids.
    def rerendered(t: Trajectory, template: str) -> list[TrainingSequence]:
        text = render(template_messages(t.messages), tools=TOOLS, enable_thinking=True, template=template)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [(m.end(), text.index("<turn|>", m.end()) + len("<turn|>"))
                 for m in re.finditer(r"<\|turn>model\n", text)]
        responses = [(m.start(), m.end()) for m in _RESPONSE.finditer(text)]
        mask = [int(any(a <= o[0] < b for a, b in spans) and not any(a <= o[0] < b for a, b in responses))
                for o in enc["offset_mapping"]]
        ids = enc["input_ids"]
        return [TrainingSequence(ids, mask, [0.0] * len(ids), 0, 0, [], [])]

    naive = choice_reproduction(traj_s, rerendered(traj_s, STRIP_THOUGHTS_TEMPLATE), logprob_tol=math.inf)
    stage_report.expect_caught("live_rerendered_history_on_stripping_template", naive, T.TOKENIZATION_REPRODUCTION,
                               mutation="training ids from re-rendering the final conversation with the "
                                        "thought-stripping template instead of vLLM's prompt/completion ids")
    control = choice_reproduction(traj, rerendered(traj, CHAT_TEMPLATE), logprob_tol=math.inf)
    stage_report.record("live_rerendered_history_on_append_only_template", **control)


# ---------------------------------------------------------------- server lifecycle ----------------

_FAKE_SERVER = textwrap.dedent("""
    import http.server, json, os, signal, subprocess, sys, time
    port, pidfile, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    print("fake vllm: loading weights", flush=True)
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
    kids = [subprocess.Popen(stubborn), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                                         start_new_session=True)]
    with open(pidfile, "w") as f:
        json.dump([os.getpid()] + [k.pid for k in kids], f)
    if mode == "hang":
        time.sleep(600)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "fake"}]}).encode() if self.path == "/v1/models" else b""
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


def _alive(pids) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_server_stop_reaps_whole_tree_even_when_the_test_body_fails(tmp_path):
    """Process handling on a fake server tree (a SIGTERM-ignoring child, a child in its own session)."""
    script = tmp_path / "fake_server.py"
    script.write_text(_FAKE_SERVER)
    pidfile = tmp_path / "pids.json"
    with pytest.raises(RuntimeError, match="test body failed"):
        with start_server(tmp_path, command=[sys.executable, str(script), "{port}", str(pidfile), "serve"],
                          startup_timeout_s=60, stop_grace_s=2, log_dir=tmp_path) as server:
            assert server.model == "fake" and server.is_running()
            assert len(_alive(json.loads(pidfile.read_text()))) == 3
            raise RuntimeError("test body failed")
    assert _alive(json.loads(pidfile.read_text())) == [] and server.surviving_processes() == []

    with pytest.raises(ServerError) as exc:
        start_server(tmp_path, command=[sys.executable, str(script), "{port}", str(pidfile), "hang"],
                     startup_timeout_s=3, stop_grace_s=2, log_dir=tmp_path)
    assert "not healthy after 3 s" in str(exc.value) and "fake vllm: loading weights" in str(exc.value)
    assert _alive(json.loads(pidfile.read_text())) == []


@pytest.mark.slow
def test_server_startup_error_is_vllms_own(tmp_path):
    """A model vLLM cannot load fails fast with the root cause from vLLM's worker log, leaving no process behind."""
    import shutil

    from fixtures.factory import fixture_dir

    broken = tmp_path / "broken"
    shutil.copytree(fixture_dir("dense"), broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["head_dim"] = 32  # weights are saved for head_dim 64
    (broken / "config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    with pytest.raises(ServerError) as exc:
        start_server(broken, enforce_eager=True, log_dir=tmp_path, startup_timeout_s=300)
    first_line = str(exc.value).splitlines()[0]
    assert "exited with code" in first_line and "Attempted to load weight" in first_line, first_line
    assert time.monotonic() - t0 < 200


_INNER_TEST = textwrap.dedent("""
    def test_uses_server_then_fails(vllm_server):
        resp = vllm_server.client().chat([{"role": "user", "content": "hi"}], max_tokens=2)
        assert resp.choices[0].model_extra["token_ids"]
        vllm_server.refresh_process_tree()
        assert False, "deliberate failure inside a test that holds the vLLM server"
""")


@pytest.mark.slow
def test_no_vllm_process_survives_a_failing_session(tmp_path, stage_report):
    """A whole pytest session using the session fixture, whose test fails: afterwards no vLLM process is alive."""
    (tmp_path / "test_inner.py").write_text(_INNER_TEST)
    pidfile = tmp_path / "vllm_pids.json"
    env = {**os.environ, "GEMMA4_VLLM_PIDFILE": str(pidfile), "PYTHONPATH": str(REPO)}
    env.pop("GEMMA4_VLLM_URL", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "validation.conftest_vllm", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "deliberate failure inside a test" in out and "1 failed" in out, out[-3000:]
    doc = json.loads(pidfile.read_text())
    assert doc["phase"] == "stopped" and len(doc["tree"]) >= 2, doc
    survivors = _alive(doc["tree"])
    stage_report.record("vllm_session_teardown", server_tree_pids=doc["tree"], survivors=survivors,
                        inner_session_s=round(time.monotonic() - t0, 1), vllm_log=doc["log"])
    assert survivors == [] and doc["survivors"] == [], f"vLLM processes survived the session: {survivors}"
